"""Stand-ins the serve tests share."""

from __future__ import annotations


class NoJobs:
    """A job service that knows no job; a test that reaches `create` has let a bad request
    through (every request these tests send must be refused before the job service)."""

    def create(self, training_file, model, hyperparameters, suffix):
        raise AssertionError("the request should have been refused before the job service")

    def get(self, job_id):
        raise KeyError(job_id)

    cancel = events = get

    def list(self):
        return []

    def delete_model(self, model_id):
        return False
