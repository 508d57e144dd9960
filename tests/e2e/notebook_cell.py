#!/usr/bin/python3
"""Runs one cell on a Jupyter server through its REST API and kernel websocket.

Usage: notebook_cell.py BASE_URL CODE [CAFILE]
The token comes from the environment (NOTEBOOK_TOKEN), so it stays out of `ps`; with
NOTEBOOK_CONNECT=ADDR set, the host of BASE_URL is connected to at ADDR (as curl --resolve:
`<job>.localhost` names need no resolver) while TLS still checks that host name. Starts a
kernel, executes CODE, prints the cell's stdout, and shuts the kernel down. BASE_URL is
http(s)://HOST:PORT; with https, CAFILE is the CA the server's certificate is checked against
(the host name in BASE_URL is checked too). Every wait is bounded; exit 0 only when the cell
ran and its status was "ok".
"""

import json
import os
import socket
import ssl
import sys
import time
import urllib.parse
import urllib.request
import uuid

import websocket

TIMEOUT = 60


def main():
    base, code = sys.argv[1].rstrip("/"), sys.argv[2]
    cafile = sys.argv[3] if len(sys.argv) > 3 else None
    token = os.environ["NOTEBOOK_TOKEN"]
    connect_to = os.environ.get("NOTEBOOK_CONNECT")
    if connect_to:
        host = urllib.parse.urlsplit(base).hostname
        resolve = socket.getaddrinfo

        def getaddrinfo(name, *args, **kwargs):
            return resolve(connect_to if name == host else name, *args, **kwargs)

        socket.getaddrinfo = getaddrinfo
    context = ssl.create_default_context(cafile=cafile) if cafile else None
    headers = {"Authorization": "token " + token}

    def rest(method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=TIMEOUT, context=context) as resp:
            text = resp.read()
            return json.loads(text) if text else None

    kernel = rest("POST", "/api/kernels", {})["id"]
    try:
        ws_url = base.replace("http", "ws", 1) + "/api/kernels/%s/channels" % kernel
        sslopt = {"ca_certs": cafile} if cafile else None
        ws = websocket.create_connection(
            ws_url, timeout=TIMEOUT, header=["Authorization: token " + token], sslopt=sslopt)
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps({
            "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex,
                       "msg_type": "execute_request", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
        }))
        out, status, idle = "", None, False
        deadline = time.monotonic() + TIMEOUT
        while (status is None or not idle) and time.monotonic() < deadline:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["header"]["msg_type"]
            if kind == "stream" and msg["content"]["name"] == "stdout":
                out += msg["content"]["text"]
            elif kind == "execute_reply":
                status = msg["content"]["status"]
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
        ws.close()
        sys.stdout.write(out)
        if status != "ok":
            sys.stderr.write("cell status: %s\n" % status)
            return 1
        return 0
    finally:
        rest("DELETE", "/api/kernels/" + kernel)


if __name__ == "__main__":
    sys.exit(main())
