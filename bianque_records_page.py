"""扁鹊 问诊记录: the review page the apps add when they record (``--record`` / BIANQUE_RECORD).

    streamlit run bianque_v1_v2_app.py -- --record sqlite:///bianque-records.db

Not run on its own: the apps list it in their navigation. All logic lives in bianque/review.py.
"""
from bianque.review import run_review_page


def main() -> None:
    run_review_page()


if __name__ == "__main__":
    main()
