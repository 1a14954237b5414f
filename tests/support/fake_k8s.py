"""A stand-in for the Kubernetes API objects the multi-node launcher calls (no cluster here)."""


class FakeKubernetes:
    """Records every call (``calls``: verb, namespace, name) and every created body (``created``);
    ``fail_job`` makes creating the workers' Job fail like a quota error."""

    def __init__(self, fail_job: bool = False):
        self.calls, self.created, self.fail_job = [], [], fail_job

    def create_namespaced_service(self, namespace, body):
        self.calls.append(("create service", namespace, body["metadata"]["name"]))
        self.created.append(body)

    def create_namespaced_job(self, namespace, body):
        if self.fail_job:
            raise RuntimeError("quota exceeded")
        self.calls.append(("create job", namespace, body["metadata"]["name"]))
        self.created.append(body)

    def delete_namespaced_job(self, name, namespace, propagation_policy=None):
        self.calls.append(("delete job", namespace, name))

    def delete_namespaced_service(self, name, namespace):
        self.calls.append(("delete service", namespace, name))
