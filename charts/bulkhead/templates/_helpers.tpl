{{/* Chart name, overridable. */}}
{{- define "bulkhead.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Resource name prefix: the release name, with the chart name unless it already contains it. */}}
{{- define "bulkhead.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The namespace of every namespaced resource. */}}
{{- define "bulkhead.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "bulkhead.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every resource. */}}
{{- define "bulkhead.labels" -}}
helm.sh/chart: {{ include "bulkhead.chart" . }}
app.kubernetes.io/name: {{ include "bulkhead.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: bulkhead
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: `include "bulkhead.selectorLabels" (list . "controller")`. */}}
{{- define "bulkhead.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "bulkhead.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "bulkhead.controller.fullname" -}}
{{- printf "%s-controller" (include "bulkhead.fullname" .) -}}
{{- end -}}

{{- define "bulkhead.agent.fullname" -}}
{{- printf "%s-agent" (include "bulkhead.fullname" .) -}}
{{- end -}}

{{- define "bulkhead.controller.serviceAccountName" -}}
{{- if .Values.controller.serviceAccount.create -}}
{{- default (include "bulkhead.controller.fullname" .) .Values.controller.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.controller.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "bulkhead.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create -}}
{{- default (include "bulkhead.agent.fullname" .) .Values.agent.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.agent.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Secrets holding tls.crt, tls.key and ca.crt for each side. */}}
{{- define "bulkhead.controller.tlsSecret" -}}
{{- printf "%s-tls" (include "bulkhead.controller.fullname" .) -}}
{{- end -}}

{{- define "bulkhead.agent.tlsSecret" -}}
{{- printf "%s-tls" (include "bulkhead.agent.fullname" .) -}}
{{- end -}}

{{/* The controller Service's DNS names. `bulkhead-controller` comes first: it is the name every
agent verifies in the controller's certificate, whatever address it dials. */}}
{{- define "bulkhead.controller.dnsNames" -}}
{{- $svc := include "bulkhead.controller.fullname" . -}}
{{- $ns := include "bulkhead.namespace" . -}}
{{- $names := list "bulkhead-controller" $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) -}}
{{- toYaml ($names | uniq) -}}
{{- end -}}

{{- define "bulkhead.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Changes whenever the certificates' source changes, so pods restart onto new ones. */}}
{{- define "bulkhead.tlsMode" -}}
{{- if .Values.tls.certManager.enabled -}}cert-manager{{- else -}}helm{{- end -}}
{{- end -}}

{{/* checkov suppressions about the image that hold only for the configured values: they vanish
when `image.digest` is set or `image.pullPolicy` is Always, and the checks then pass. */}}
{{- define "bulkhead.imageScanSkips" -}}
{{- if not .Values.image.digest }}
checkov.io/skip-digest: CKV_K8S_43=image.digest is empty so the image is pinned by its release tag (the chart's appVersion); set image.digest to pin it by content
{{- end }}
{{- if ne .Values.image.pullPolicy "Always" }}
checkov.io/skip-pull: CKV_K8S_15=a versioned image needs no pull on every start; with IfNotPresent a node's agent restarts even while the registry is unreachable
{{- end }}
{{- end -}}

{{/* Refuse combinations that cannot work. */}}
{{- define "bulkhead.validate" -}}
{{- if and (gt (int .Values.controller.replicas) 1) (not .Values.controller.leaderElection.enabled) -}}
{{- fail "controller.replicas > 1 needs controller.leaderElection.enabled: two controllers without a lease would both serve rule sets" -}}
{{- end -}}
{{- if and .Values.controller.flowHistory.enabled .Values.controller.flowHistory.existingClaim (gt (int .Values.controller.replicas) 1) -}}
{{- fail "controller.flowHistory.existingClaim needs controller.replicas: 1 (replicas cannot share one ReadWriteOnce store); leave it empty for an emptyDir per replica" -}}
{{- end -}}
{{- if ge (int .Values.tls.renewBeforeDays) (int .Values.tls.validityDays) -}}
{{- fail "tls.renewBeforeDays must be less than tls.validityDays, or every helm upgrade would regenerate the certificates" -}}
{{- end -}}
{{- $ports := list (int .Values.controller.grpcPort) (int .Values.controller.httpPort) (int .Values.controller.metricsPort) -}}
{{- if ne (len ($ports | uniq)) 3 -}}
{{- fail "controller.grpcPort, controller.httpPort and controller.metricsPort must differ" -}}
{{- end -}}
{{- if eq (int .Values.agent.metrics.port) (int .Values.agent.http.port) -}}
{{- fail "agent.metrics.port and agent.http.port must differ" -}}
{{- end -}}
{{- end -}}

{{/* The controller verifies agents' service-account tokens (TokenReview). */}}
{{- define "bulkhead.agentTokenReview" -}}
{{- if and .Values.agent.enabled .Values.agent.tokenReview.enabled -}}true{{- end -}}
{{- end -}}

{{/* The audience of the agents' projected tokens: only the controller accepts them. */}}
{{- define "bulkhead.agentTokenAudience" -}}bulkhead-controller{{- end -}}
