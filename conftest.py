"""Repo-only settings for running this repository's own suites (the plugin itself is
registered by its pytest11 entry point, never here)."""

import os

# TensorFlow's C++ start-up chatter would bury test output in every spawned process.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
