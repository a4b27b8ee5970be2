#!/usr/bin/env python3
"""End-to-end check with a producer in another language: publishes jobs straight to RabbitMQ
(pika, the documented wire format) and through the HTTP API, with repeated dedup keys, then
verifies through the API that every job has the right status and result and every `tally`
counter equals the number of distinct keys that targeted it.

Usage: e2e.py API_URL AMQP_URL QUEUE JOBS   (run by scripts/e2e, which starts the processes)
"""
import collections
import concurrent.futures
import json
import random
import sys
import time
import urllib.request
import uuid

import pika

api, amqp_url, queue, total = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
COUNTERS = 10
REPEAT = 3  # each key is sent this many times


def http(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(api + path, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.status, json.loads(resp.read())


keys = total // REPEAT
plan = []  # (via, key, counter)
for k in range(keys):
    counter = f"e2e{k % COUNTERS}"
    via = "amqp" if k % 2 == 0 else "http"
    plan += [(via, f"key-{k}", counter)] * REPEAT
random.seed(7)
random.shuffle(plan)

start = time.time()
conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
ch = conn.channel()
ch.confirm_delivery()
raw_ids = collections.defaultdict(list)
http_jobs = []
for via, key, counter in plan:
    if via == "amqp":
        jid = str(uuid.uuid4())
        raw_ids[key].append(jid)
        body = {"id": jid, "kind": "tally", "payload": {"counter": counter}, "dedup_key": key}
        ch.basic_publish("", queue, json.dumps(body),
                         pika.BasicProperties(delivery_mode=2, content_type="application/json", message_id=jid))
    else:
        http_jobs.append((key, counter))
conn.close()


def post(item):
    key, counter = item
    status, job = http("POST", "/v1/jobs", {"kind": "tally", "payload": {"counter": counter}, "dedup_key": key})
    return key, status, job["id"]


http_ids = collections.defaultdict(set)
statuses = collections.Counter()
with concurrent.futures.ThreadPoolExecutor(16) as pool:
    for key, status, jid in pool.map(post, http_jobs):
        http_ids[key].add(jid)
        statuses[status] += 1
published = time.time()
assert all(len(ids) == 1 for ids in http_ids.values()), "HTTP dedup returned different ids for one key"
assert statuses[202] == len(http_ids), f"one 202 per HTTP key, got {statuses}"

# Long-poll every job to its final state through the API.
def settle(jid):
    for _ in range(30):
        status, job = http("GET", f"/v1/jobs/{jid}?wait=10")
        if job["status"] in ("succeeded", "duplicate", "dead", "failed", "cancelled"):
            return job
    raise SystemExit(f"job {jid} did not finish: {job}")


all_ids = [j for ids in raw_ids.values() for j in ids] + [j for ids in http_ids.values() for j in ids]
with concurrent.futures.ThreadPoolExecutor(32) as pool:
    jobs = {j["id"]: j for j in pool.map(settle, all_ids)}
done = time.time()

by_status = collections.Counter(j["status"] for j in jobs.values())
for key, ids in raw_ids.items():
    st = sorted(jobs[i]["status"] for i in ids)
    assert st == ["duplicate"] * (REPEAT - 1) + ["succeeded"], f"{key}: {st}"
    owner = next(i for i in ids if jobs[i]["status"] == "succeeded")
    assert all(jobs[i]["duplicate_of"] == owner for i in ids if i != owner)
for key, ids in http_ids.items():
    (jid,) = ids
    assert jobs[jid]["status"] == "succeeded", jobs[jid]

expected = collections.Counter(f"e2e{k % COUNTERS}" for k in range(keys))
# The final value of each counter is the largest `value` any of its jobs returned.
seen = collections.defaultdict(int)
for j in jobs.values():
    if j["status"] == "succeeded":
        c = j["payload"]["counter"]
        seen[c] = max(seen[c], j["result"]["value"])
assert dict(seen) == dict(expected), f"tally mismatch: {dict(seen)} != {dict(expected)}"

print(json.dumps({
    "messages_sent": len(plan),
    "distinct_keys": keys,
    "raw_amqp_messages": sum(len(v) for v in raw_ids.values()),
    "http_requests": len(http_jobs),
    "http_202": statuses[202], "http_200": statuses[200],
    "records_by_status": dict(by_status),
    "tally_exact": True,
    "publish_seconds": round(published - start, 2),
    "total_seconds": round(done - start, 2),
}, indent=2))
