-- wrk script: POST /v1/jobs with a small echo job, each request a new job.
-- Run by scripts/bench-http: wrk -t2 -c32 -d10s -s benches/http_enqueue.lua http://127.0.0.1:PORT
wrk.method = "POST"
wrk.path = "/v1/jobs"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"kind":"echo","payload":{"data":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}'

function done(summary, latency, requests)
  local errors = summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format("enqueued %d jobs in %.1fs: %.0f jobs/s, %d errors, p50 %.1f ms, p99 %.1f ms\n",
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6), errors,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
