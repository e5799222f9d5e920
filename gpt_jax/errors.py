"""Errors in what the user gave (config, files, flags): binaries print them as one line."""


class ConfigError(ValueError):
  """A config field, flag or input file is wrong; the message names it."""
