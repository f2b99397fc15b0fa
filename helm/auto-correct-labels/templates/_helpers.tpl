{{/* Labels on every object of this chart. */}}
{{- define "acl.labels" -}}
app.kubernetes.io/name: auto-correct-labels
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* Namespace of the Airflow release: where its service accounts, ConfigMaps and Secret live. */}}
{{- define "acl.airflowNamespace" -}}
{{- .Values.airflow.namespace | default .Release.Namespace -}}
{{- end }}

{{/* Name of the S3 credentials Secrets (one per namespace). */}}
{{- define "acl.s3SecretName" -}}
{{- .Values.s3.existingSecret | default "acl-s3-credentials" -}}
{{- end }}

{{/* S3 endpoint: s3.endpoint, else the dev MinIO when enabled, else empty (AWS S3). */}}
{{- define "acl.s3Endpoint" -}}
{{- if .Values.s3.endpoint -}}
{{- .Values.s3.endpoint -}}
{{- else if .Values.minio.enabled -}}
{{- printf "http://acl-minio.%s.svc.cluster.local:9000" (include "acl.airflowNamespace" .) -}}
{{- end -}}
{{- end }}
