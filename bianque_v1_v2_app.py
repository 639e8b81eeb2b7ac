"""扁鹊 Chain of Questioning: BianQue-1.0 asks follow-up questions, then BianQue-2.0 advises.

    streamlit run bianque_v1_v2_app.py -- --v1-model DIR --v2-model DIR --device cuda:0

Settings come from the arguments after ``--`` and from BIANQUE_* environment variables (see the
README); all logic lives in bianque/ui.py.
"""
from bianque.ui import AppConfig, configure_logging, run_app

CONFIG = AppConfig(
    mode="coq",
    title="扁鹊 · 主动健康问诊",
    caption="BianQue-1.0 先追问病情，再由 BianQue-2.0 根据完整对话给出建议。",
    page_title="扁鹊 BianQue · 问询与建议",
)


def main() -> None:
    configure_logging()
    run_app(CONFIG)


if __name__ == "__main__":
    main()
