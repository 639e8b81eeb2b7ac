"""扁鹊 BianQue-1.0: the questioning model on its own (it asks short follow-up questions).

    streamlit run bianque_v1_app.py -- --v1-model DIR --device cpu

Settings come from the arguments after ``--`` and from BIANQUE_* environment variables (see the
README); all logic lives in bianque/ui.py.
"""
from bianque.ui import AppConfig, configure_logging, run_app

CONFIG = AppConfig(
    mode="v1",
    title="扁鹊 · BianQue-1.0",
    caption="BianQue-1.0 通过多轮追问了解您的情况。",
    page_title="扁鹊 BianQue-1.0",
)


def main() -> None:
    configure_logging()
    run_app(CONFIG)


if __name__ == "__main__":
    main()
