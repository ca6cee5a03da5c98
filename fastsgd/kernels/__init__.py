"""Kernel backends, one module each, with identical functional signatures
(see reference.py for the contract). Use fastsgd.backends to pick one."""
