"""User-facing errors: one clear sentence saying what failed and what to do about it."""


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded (missing files, no network, wrong shapes)."""
