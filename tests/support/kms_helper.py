#!/usr/bin/env python3
"""A test helper for pullgate's `exec` key provider (README, "The exec protocol").

One JSON request per line on stdin, one JSON answer per line on stdout. The KEK is derived
from a secret and the version in DIR/version (default "1"); DIR/state says how to answer:
"ok" (default), "denied" or "unavailable". Wrapping is a SHA-256 keystream with an HMAC
tag: enough to test the protocol, not a KMS.
"""
import base64
import hashlib
import hmac
import json
import os
import sys

DIR = sys.argv[1]
SECRET = b"pullgate-test-kek"


def read(name, default):
    try:
        with open(os.path.join(DIR, name)) as f:
            return f.read().strip() or default
    except FileNotFoundError:
        return default


def kek(version):
    return hashlib.sha256(SECRET + b"/" + version.encode()).digest()


def stream(key, nonce, n):
    return hashlib.sha256(key + b"stream" + nonce).digest()[:n]


def wrap(key_b64, version):
    key = base64.b64decode(key_b64)
    nonce = os.urandom(16)
    k = kek(version)
    body = bytes(a ^ b for a, b in zip(key, stream(k, nonce, len(key))))
    tag = hmac.new(k, nonce + body, "sha256").digest()
    return base64.b64encode(nonce + body + tag).decode()


def unwrap(ciphertext, version):
    raw = base64.b64decode(ciphertext)
    nonce, body, tag = raw[:16], raw[16:-32], raw[-32:]
    k = kek(version)
    if not hmac.compare_digest(tag, hmac.new(k, nonce + body, "sha256").digest()):
        return None
    return base64.b64encode(bytes(a ^ b for a, b in zip(body, stream(k, nonce, len(body))))).decode()


def answer(req):
    state = read("state", "ok")
    if state != "ok":
        return {"error": state, "message": "the test says so"}
    version = read("version", "1")
    op = req.get("op")
    if op == "status":
        return {"kek_version": version}
    if op == "wrap":
        return {"kek_version": version, "ciphertext": wrap(req["key"], version)}
    if op == "unwrap":
        key = unwrap(req["ciphertext"], req["kek_version"])
        if key is None:
            return {"error": "denied", "message": "does not open"}
        return {"key": key}
    if op == "rewrap":
        return {"error": "unsupported", "message": "wrap it again"}
    return {"error": "unavailable", "message": "unknown op"}


for line in sys.stdin:
    sys.stdout.write(json.dumps(answer(json.loads(line))) + "\n")
    sys.stdout.flush()
