{{/* The chart name, as in labels. */}}
{{- define "fedtrain.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object name: the release name, plus the chart name unless it has it. */}}
{{- define "fedtrain.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The operator's objects: Deployment, ClusterRole, Roles and their bindings. */}}
{{- define "fedtrain.operatorName" -}}
{{- printf "%s-operator" (include "fedtrain.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fedtrain.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fedtrain.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name: name the existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "fedtrain.leaseName" -}}
{{- default (include "fedtrain.operatorName" .) .Values.operator.leaderElection.leaseName }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "fedtrain.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "fedtrain.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fedtrain
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* What selects the operator's pods (the Deployment, its Service, the aggregators' NetworkPolicy). */}}
{{- define "fedtrain.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "fedtrain.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- /* What operator/manifests.py gives every aggregator pod it makes (MANAGED_BY, COMPONENT). */}}
{{- define "fedtrain.aggregatorSelectorLabels" -}}
app.kubernetes.io/managed-by: fedtrain-operator
app.kubernetes.io/component: aggregator
{{- end }}

{{- define "fedtrain.operatorLabels" -}}
{{ include "fedtrain.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/* An image reference from {repository, tag}; the tag defaults to the chart's appVersion. */}}
{{- define "fedtrain.image" -}}
{{- $tag := .image.tag | default .context.Chart.AppVersion }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}

{{/*
The namespaces the operator serves, as a JSON list (use with fromJsonArray): watchNamespaces, then
the siteNamespaces not among them. Empty: every namespace (cluster-wide).
*/}}
{{- define "fedtrain.servedNamespaces" -}}
{{- concat .Values.watchNamespaces .Values.siteNamespaces | uniq | toJson }}
{{- end }}

{{/* "true" when the operator serves listed namespaces only, with namespaced Roles. */}}
{{- define "fedtrain.namespaced" -}}
{{- if .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/*
The training namespaces that get the aggregators' NetworkPolicy: watchNamespaces and
networkPolicy.namespaces.
*/}}
{{- define "fedtrain.networkPolicyNamespaces" -}}
{{- concat .Values.watchNamespaces .Values.networkPolicy.namespaces | uniq | toJson }}
{{- end }}

{{/* Combinations of values the schema cannot rule out; each failure says how to fix it. */}}
{{- define "fedtrain.validate" -}}
{{- if and .Values.siteNamespaces (not .Values.watchNamespaces) }}
{{- fail "siteNamespaces is set but watchNamespaces is empty: list the training namespaces in watchNamespaces too, or empty siteNamespaces for a cluster-wide operator" }}
{{- end }}
{{- if and (gt (int .Values.operator.replicas) 1) (not .Values.operator.leaderElection.enabled) }}
{{- fail "operator.replicas is more than 1 but operator.leaderElection.enabled is false: two replicas would act at once; turn leader election on" }}
{{- end }}
{{- $lease := .Values.operator.leaderElection }}
{{- if ge (float64 $lease.renewSeconds) (float64 $lease.leaseDurationSeconds) }}
{{- fail "operator.leaderElection.renewSeconds must be less than leaseDurationSeconds, or the Lease expires between renewals" }}
{{- end }}
{{- if eq (int .Values.operator.livenessPort) (int .Values.operator.metricsPort) }}
{{- fail "operator.livenessPort and operator.metricsPort must differ" }}
{{- end }}
{{- end }}
