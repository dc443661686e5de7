{{- define "flywheel.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "flywheel.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "flywheel.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "flywheel.fullname" .)) -}}
{{- end -}}

{{/* The environment every flywheel container gets: the ConfigMap of settings and the secret ones. */}}
{{- define "flywheel.env" -}}
envFrom:
  - configMapRef:
      name: {{ include "flywheel.fullname" . }}-settings
env:
  - name: FLYWHEEL_API__KEYS
    valueFrom: {secretKeyRef: {name: {{ include "flywheel.secretName" . }}, key: FLYWHEEL_API__KEYS}}
  - name: FLYWHEEL_LAKE__AWS_ACCESS_KEY_ID
    valueFrom: {secretKeyRef: {name: {{ include "flywheel.secretName" . }}, key: FLYWHEEL_LAKE__AWS_ACCESS_KEY_ID, optional: true}}
  - name: FLYWHEEL_LAKE__AWS_SECRET_ACCESS_KEY
    valueFrom: {secretKeyRef: {name: {{ include "flywheel.secretName" . }}, key: FLYWHEEL_LAKE__AWS_SECRET_ACCESS_KEY, optional: true}}
  - name: FLYWHEEL_KAFKA__SASL_PASSWORD
    valueFrom: {secretKeyRef: {name: {{ include "flywheel.secretName" . }}, key: FLYWHEEL_KAFKA__SASL_PASSWORD, optional: true}}
{{- end -}}
