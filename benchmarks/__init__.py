"""`python -m benchmarks`: the performance benchmark of issue 5.

Everything is measured in one run, next to baselines measured in the same run
on the same machine (a bare grpcio echo server, raw AES-GCM), and reported as
figures plus ratios against those baselines. It reports; it asserts nothing.
"""
