"""A FIPS-mode host's hashlib, for tests/test_push.py (which puts this folder on PYTHONPATH): as
with OpenSSL in FIPS mode, MD5 refuses to hash unless the caller says the digest is not for
security (`usedforsecurity=False`), through hashlib.md5 and hashlib.new alike."""

import hashlib

_md5, _new = hashlib.md5, hashlib.new


def _refuse() -> None:
    raise ValueError("[digital envelope routines] unsupported: MD5 is disabled for FIPS")


def md5(*args, usedforsecurity=True, **kwargs):
    if usedforsecurity:
        _refuse()
    return _md5(*args, usedforsecurity=False, **kwargs)


def new(name, *args, usedforsecurity=True, **kwargs):
    if name.lower() == "md5" and usedforsecurity:
        _refuse()
    return _new(name, *args, usedforsecurity=usedforsecurity, **kwargs)


hashlib.md5, hashlib.new = md5, new
