"""`python -m benchmarks`: the performance benchmark (docs/performance.md).

Everything is measured in one run, next to baselines measured in the same run
on the same machine (a bare grpcio echo server, raw AES-GCM, and with
`--peer openbao` OpenBao's transit engine, the server operators would run
instead), and reported as figures plus ratios against those baselines. It
reports; it asserts nothing.
"""
