"""Test support: a local GCS emulator that every gs:// client in the stack can reach."""
