"""DRS on the server: the pass per cluster (service.py), its stored recommendations (store.py) and
their API views (views.py). The decisions are made in the pure ``vmshift.placement`` package."""
