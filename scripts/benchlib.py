"""What the cluster benchmarks (bench_failover.py, bench_snapshot.py) share: HTTP calls to a
node with a timeout, and waiting for a condition with a deadline."""
import json
import sys
import time
import urllib.request

TIMEOUT = 5.0


def call(url, path, body=None):
    """(status, body) of a request to a node: the body as JSON when it is JSON, else as text;
    (status, None) for an HTTP error, (None, None) when the node did not answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data,
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
            raw = answer.read()
            try:
                return answer.status, json.loads(raw or b"null")
            except ValueError:
                return answer.status, raw.decode()
    except urllib.error.HTTPError as error:
        return error.code, None
    except OSError:
        return None, None


def wait_for(script, what, predicate, seconds=60):
    """The first truthy value of `predicate`, polled every 50 ms; exits naming `script` if
    none comes within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    sys.exit(f"{script}: {what} did not happen within {seconds} s")
