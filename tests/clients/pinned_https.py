#!/usr/bin/env python3
"""One chat completion over HTTPS from a client that pins its CA inside the program (the
`--cafile` it is given), whatever its environment's trust variables say: the case tollgate's
`intercept: auto` cannot see from outside and learns from a failed handshake.

Usage: pinned_https.py --cafile PEM --host NAME --model M
Output: one JSON object: {"ok": true, "usage": {...}} or {"ok": false, "error": "..."}
"""

import argparse
import http.client
import json
import ssl


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cafile", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--model", required=True)
    a = p.parse_args()
    ctx = ssl.create_default_context(cafile=a.cafile)
    body = json.dumps({"model": a.model, "messages": [{"role": "user", "content": "Pinned hello."}]})
    conn = http.client.HTTPSConnection(a.host, 443, context=ctx, timeout=10)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=body,
            headers={"Content-Type": "application/json", "Authorization": "Bearer sk-pinned"},
        )
        r = conn.getresponse()
        data = json.loads(r.read())
        print(json.dumps({"ok": r.status == 200, "status": r.status, "usage": data.get("usage")}))
    except (ssl.SSLError, OSError) as e:
        print(json.dumps({"ok": False, "error": str(e)}))
    finally:
        conn.close()


if __name__ == "__main__":
    main()
