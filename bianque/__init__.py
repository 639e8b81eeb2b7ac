"""BianQue (扁鹊): proactive-health chat with a questioning model (v1) and an advising model (v2)."""

__version__ = "2.1.0"
