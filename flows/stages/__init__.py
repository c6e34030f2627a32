"""One module per pipeline stage, each owning its Prefect task(s) and flow.

``data`` -> ``train`` -> ``explain`` -> ``evaluate`` -> ``report``; ``pipeline`` runs them all in one
flow and ``registry`` lists them for the command line (``python -m flows.stages``) and the
deployments (``python -m flows.serve``).
"""
