"""The benchmark machinery, shared by the entry points (`benchmarks.run`, `benchmarks.streaming`,
`benchmarks.suite` through `run --suite full`, `benchmarks.quota_store`).

One module owns one thing:

- `configs`: the scenario, the gateway's config, the Envoy-only baseline's and the floor's
  bootstraps, ports, the streaming variants and the paths they take;
- `stack`: the process tree (fake LLMs, baseline Envoy, the floor, gateway, redis-server),
  started and stopped;
- `floor`: the do-nothing ext_proc server of the floor target;
- `procstat`: CPU time, RSS and open-files limits of running processes (/proc);
- `chat_client`: the closed-loop Python chat load client and the pre-flight request;
- `wrk`: wrk as the chat load generator (its Lua script, runs and output);
- `stream_client`: the streaming load client, its latency and memory phases;
- `chat_scenario`: one chat scenario measured (Envoy alone, the floor and gateway alternated);
- `stream_scenario`: the streaming benchmark measured;
- `quota_store`: the quota store alone, embedded against Redis;
- `stats`: percentiles, medians over runs, differences and ratios, the summaries;
- `budget`: the performance budget's rows and table;
- `report`: the markdown of every report;
- `results`: the result files (envelope, JSON, markdown, plots);
- `plots`: the PNG plots (matplotlib, the `bench` extra);
- `argtypes`, `runtime`: what the entry points share (argument types, event loop, SIGTERM).

Imports go one way: entry points import this package (and `run` imports `suite`, which uses
the `streaming` and `quota_store` argument parsers); nothing here imports an entry point.
"""
