"""Learning from the request history: training, the exported latency model, evaluation.

Imports go one way: this package uses routing and history, never the HTTP layer.
"""
