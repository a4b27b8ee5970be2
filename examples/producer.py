#!/usr/bin/env python3
"""Enqueue Apiary jobs from Python with no Apiary code: publish the documented wire format.

    pip install pika
    python3 examples/producer.py [COUNT]

Environment: AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f), APIARY_QUEUE
(default apiary.jobs). Prints the ids it published, one per line.
"""
import json
import os
import sys
import uuid

import pika

url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
queue = os.environ.get("APIARY_QUEUE", "apiary.jobs")
count = int(sys.argv[1]) if len(sys.argv) > 1 else 1

conn = pika.BlockingConnection(pika.URLParameters(url))
channel = conn.channel()
channel.confirm_delivery()  # basic_publish now raises unless the broker confirms
for i in range(count):
    job_id = str(uuid.uuid4())
    body = {"id": job_id, "kind": "tally", "payload": {"counter": f"py{i % 10}"}, "dedup_key": f"py-{i}"}
    channel.basic_publish(
        exchange="",
        routing_key=queue,
        body=json.dumps(body),
        properties=pika.BasicProperties(delivery_mode=2, content_type="application/json", message_id=job_id),
    )
    print(job_id)
conn.close()
