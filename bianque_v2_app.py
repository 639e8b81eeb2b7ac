"""扁鹊 BianQue-2.0: the advising model on its own (ChatGLM-6B fine-tune, run natively).

    streamlit run bianque_v2_app.py -- --v2-model DIR --device cuda:1 --dtype float16

Settings come from the arguments after ``--`` and from BIANQUE_* environment variables (see the
README); all logic lives in bianque/ui.py.
"""
from bianque.ui import AppConfig, configure_logging, run_app

CONFIG = AppConfig(
    mode="v2",
    title="扁鹊 · BianQue-2.0",
    caption="BianQue-2.0 根据您描述的情况给出健康建议。",
    page_title="扁鹊 BianQue-2.0",
)


def main() -> None:
    configure_logging()
    run_app(CONFIG)


if __name__ == "__main__":
    main()
