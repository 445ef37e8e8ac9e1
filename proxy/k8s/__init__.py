"""`keyless webhook`: the Kubernetes mutating admission webhook that injects keyless.

annotations.py reads a pod's keyless.io/* options, defaults.py the webhook's config file,
inject.py turns a pod and its options into a JSON Patch (pure), review.py answers one
AdmissionReview, server.py serves them over HTTPS with certificates that rotate in place.
"""
