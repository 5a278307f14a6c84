"""The checkpoint package's error type (its own module so every checkpoint module can import it)."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt or does not match the model. The message names the
    file or value and the fix."""
