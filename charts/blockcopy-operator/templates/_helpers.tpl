{{/* Chart name, truncated to 63 characters (a DNS label). */}}
{{- define "blockcopy-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: the release name, plus the chart name unless the release name
already contains it. Also names the cluster-scoped objects (ClusterRole, ClusterRoleBinding,
admission policy), so two releases in different namespaces must have different names.
*/}}
{{- define "blockcopy-operator.fullname" -}}
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

{{- define "blockcopy-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "blockcopy-operator.labels" -}}
helm.sh/chart: {{ include "blockcopy-operator.chart" . }}
{{ include "blockcopy-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: blockcopy-operator
{{- end }}

{{/* Labels that select the agent pods (immutable in a DaemonSet: never add to these). */}}
{{- define "blockcopy-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "blockcopy-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The ServiceAccount the agent runs as. */}}
{{- define "blockcopy-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "blockcopy-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest is given (it wins over the tag). */}}
{{- define "blockcopy-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* Labels that select the plan controller's pod: none of the agent's selector (the
DaemonSet and the metrics Service select the agents by theirs). */}}
{{- define "blockcopy-operator.controllerSelectorLabels" -}}
app.kubernetes.io/name: {{ include "blockcopy-operator.name" . | trunc 52 }}-controller
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels on the plan controller's objects. */}}
{{- define "blockcopy-operator.controllerLabels" -}}
helm.sh/chart: {{ include "blockcopy-operator.chart" . }}
{{ include "blockcopy-operator.controllerSelectorLabels" . }}
app.kubernetes.io/component: controller
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: blockcopy-operator
{{- end }}
