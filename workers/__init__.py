"""The workers: Celery app and tasks, device-pinned launcher, generator backends, result writer.

Importing this package is cheap: torch and the models load only in a worker process.
"""
