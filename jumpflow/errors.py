"""The one error type for bad configuration values, shared by every layer.

``ConfigError(key, message)`` carries the offending key as data (``err.key``), so a caller
that knows the group prefixes it (``err.within("objective")``) without parsing message
text; ``str(err)`` is one line ``"<key>: <message>"``. It is a ``ValueError``, so code that
catches bad values generically keeps working."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value; ``str(err)`` is ``"<key>: <message>"`` (one line)."""

    def __init__(self, key: str, message: str):
        self.key, self.message = str(key), " ".join(str(message).split())
        super().__init__(f"{self.key}: {self.message}")

    def within(self, group: str) -> ConfigError:
        """The same error with its key under ``group`` (``objective`` + ``ratio`` ->
        ``objective.ratio``); a key that already starts with ``group.`` is kept."""
        if not group or self.key == group or self.key.startswith(f"{group}."):
            return self
        return ConfigError(f"{group}.{self.key}" if self.key else group, self.message)
