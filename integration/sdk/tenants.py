"""Tenants as the official OpenAI Python SDK sees them (run by integration/tests/tenants.rs).

    python tenants.py BASE_URL

A key no tenant holds → openai.AuthenticationError (401, invalid_api_key). A tenant over
its requests per minute → openai.RateLimitError; with retries on, the SDK's own backoff
honours the router's Retry-After and the call succeeds. Prints one line per check.
"""
import sys
import time

import openai

base = sys.argv[1].rstrip("/") + "/v1"
msgs = [{"role": "user", "content": "hi"}]


def client(key, retries=0):
    return openai.OpenAI(base_url=base, api_key=key, max_retries=retries, timeout=30)


try:
    client("not-a-tenant").chat.completions.create(model="tiny", messages=msgs, max_tokens=1)
    sys.exit("a key no tenant holds was let in")
except openai.AuthenticationError as e:
    assert e.status_code == 401 and e.code == "invalid_api_key", (e.status_code, e.code)
    print("AuthenticationError invalid_api_key")

# spend team-fast's bucket (120 a minute: one more every 0.5 s) until the SDK is refused
fast = client("secret-key-fast")
for sent in range(1, 400):
    try:
        fast.chat.completions.create(model="tiny", messages=msgs, max_tokens=1)
    except openai.RateLimitError as e:
        assert e.code == "rate_limit_exceeded", e.code
        retry_after = e.response.headers.get("retry-after")
        limit = e.response.headers.get("x-ratelimit-limit-requests")
        assert retry_after and 1 <= int(retry_after) <= 60, retry_after
        assert limit == "120", limit
        print(f"RateLimitError after {sent} requests, Retry-After {retry_after}, limit {limit}")
        break
else:
    sys.exit("the tenant's limit never refused a request")

# the SDK's own retries wait as told and get through
t0 = time.monotonic()
r = client("secret-key-fast", retries=3).chat.completions.create(model="tiny", messages=msgs, max_tokens=1)
waited = time.monotonic() - t0
assert r.choices and r.id.startswith("chatcmpl-"), r
print(f"retried by the SDK: succeeded after {waited:.2f}s")
