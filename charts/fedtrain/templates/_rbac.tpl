{{/*
The operator's RBAC rules, in groups by where they apply. Every verb is one the code uses:
operator/kube.py (the calls), operator/reconcile.py (which kinds, in which namespace),
operator/handlers.py (what kopf watches, the clean-up), operator/leader.py (the Lease) and kopf
itself (list and watch, merge patches, POSTed Events). Kube.apply is create-then-patch, so it
needs no get; nothing is ever updated (PUT): every change is a merge patch, and the one `update`
below is a permission check, not a call.
*/}}

{{/* Every namespace the operator serves: kopf runs a watch per handled kind and namespace. */}}
{{- define "fedtrain.rules.served" -}}
# kopf lists and watches FederatedTrainings in every namespace it serves (handlers.py: the
# training daemon, the spec-change event handler and the deletion handler).
- apiGroups: ["fedtrain.io"]
  resources: ["federatedtrainings"]
  verbs: ["list", "watch"]
# kopf lists and watches the operator's Jobs in every namespace it serves (handlers.py
# job_event keeps the Job table); the deletion clean-up lists them by label too.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch"]
{{- end }}

{{/* Namespaces FederatedTrainings live in: the training itself and its aggregator. */}}
{{- define "fedtrain.rules.training" -}}
# kopf adds and removes its finalizer and keeps its progress in annotations, by merge patches.
- apiGroups: ["fedtrain.io"]
  resources: ["federatedtrainings"]
  verbs: ["patch"]
# The status subresource: one merge patch per reconcile (Kube.patch_training_status).
- apiGroups: ["fedtrain.io"]
  resources: ["federatedtrainings/status"]
  verbs: ["patch"]
# The aggregator's objects are owned by the training with blockOwnerDeletion, which API servers
# with the OwnerReferencesPermissionEnforcement admission plugin (OpenShift) allow only to a client
# that may update the owner's finalizers. Nothing is ever sent to this subresource.
- apiGroups: ["fedtrain.io"]
  resources: ["federatedtrainings/finalizers"]
  verbs: ["update"]
# RoundStarted, RoundClosed, Straggler, ...: kopf.event POSTs core v1 Events beside the training.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# Secrets here, by name only (never listed or watched): the aggregator's token (created once,
# read back by a restarted operator) and the user's spec.storage.credentialsSecret (read, to
# presign URLs). Both go with their owner (the training) through garbage collection.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create"]
# The aggregator's pods, listed by its Deployment's labels when it does not answer: their
# container's waiting reason or last termination names the cause in the Waiting condition.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
# The aggregator's ConfigMap (the training) and Service: created or patched to the spec
# (Kube.apply), deleted with the training.
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["create", "patch", "list", "delete"]
# The aggregator Deployment: created or patched to the spec (Kube.apply), scaled to 0 and back
# by merge patches, deleted with the training.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["create", "patch", "list", "delete"]
# The deletion clean-up also removes the training's Jobs from its own namespace.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["delete"]
{{- end }}

{{/* Namespaces the sites' trainer Jobs run in. */}}
{{- define "fedtrain.rules.site" -}}
# One trainer Job per site, round and attempt: created ("already exists" is expected), read back
# when it existed already (its uid owns the Secret), deleted when a training is suspended or deleted.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["create", "get", "delete"]
# Each Job's Secret of presigned URLs, created owned by its Job: garbage collection removes it
# with the Job (its TTL, a stop, the clean-up), so the operator never reads, lists or deletes one.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
{{- end }}

{{/* Cluster-scoped reads kopf needs in either mode. */}}
{{- define "fedtrain.rules.crds" -}}
# kopf's resource observer lists CustomResourceDefinitions and watches them for changes.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end }}

{{/* Cluster-scoped reads kopf needs when it serves a list of namespaces. */}}
{{- define "fedtrain.rules.namespaces" -}}
# Serving a list of namespaces, kopf lists and watches Namespaces to learn which of them exist.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
