{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "ckptd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full resource name prefix: release name + chart name unless the release name has it. */}}
{{- define "ckptd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of the headless peer Service (peers.dns_name resolves it). */}}
{{- define "ckptd.peerService" -}}
{{- printf "%s-peers" (include "ckptd.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ckptd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ckptd.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels that select the daemon pods (never change them on upgrade: immutable). */}}
{{- define "ckptd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ckptd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: daemon
{{- end -}}

{{- define "ckptd.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "ckptd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "ckptd.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Paths inside the daemon container (the hostPaths are mounted at the same paths). */}}
{{- define "ckptd.socketPath" -}}
{{- printf "%s/ckptd.sock" (trimSuffix "/" .Values.hostPaths.socketDir) -}}
{{- end -}}
{{- define "ckptd.configDir" -}}/etc/ckptd/config{{- end -}}
{{- define "ckptd.authDir" -}}/etc/ckptd/auth{{- end -}}
{{- define "ckptd.tlsDir" -}}/etc/ckptd/tls{{- end -}}

{{/* Memory request and limit of the daemon: shared-memory budget + process overhead. */}}
{{- define "ckptd.memory" -}}
{{- printf "%dMi" (add .Values.memory.budgetMiB .Values.memory.overheadMiB | int) -}}
{{- end -}}

{{/* The daemon's config file (daemon/config.py schema): user settings from .Values.config,
     then everything the chart must keep consistent with mounts, ports and Services. */}}
{{- define "ckptd.config" -}}
{{- $v := .Values -}}
{{- $cfg := deepCopy $v.config -}}
{{- $peers := merge (dict
      "dns_name" (printf "%s.%s.svc.%s" (include "ckptd.peerService" .) .Release.Namespace $v.clusterDomain)
      "dns_port" $v.ports.peer) (default (dict) $cfg.peers) -}}
{{- $_ := set $cfg "peers" $peers -}}
{{- $_ = set $cfg "socket_path" (include "ckptd.socketPath" .) -}}
{{- if not (kindIs "invalid" $v.socketGroup) -}}
{{- $_ = set $cfg "socket_group" ($v.socketGroup | int) -}}
{{- end -}}
{{- $_ = set $cfg "listen" (dict "host" "0.0.0.0" "port" $v.ports.peer) -}}
{{- $_ = set $cfg "data" (dict "port" $v.ports.data) -}}
{{- $_ = set $cfg "health_port" $v.ports.health -}}
{{- $_ = set $cfg "metrics" (dict "host" "0.0.0.0" "port" $v.ports.metrics) -}}
{{- $_ = set $cfg "memory" (dict "shm_dir" $v.hostPaths.shmDir "budget_bytes" (printf "%dMiB" ($v.memory.budgetMiB | int))) -}}
{{- $_ = set $cfg "auth" (dict "token_file" (printf "%s/token" (include "ckptd.authDir" .))) -}}
{{- $persist := dict "root_url" (default nil $v.persistence.rootUrl) -}}
{{- with $v.persistence.rateLimit }}{{ $_ = set $persist "rate_limit" . }}{{ end -}}
{{- with $v.persistence.s3.endpointUrl -}}
{{- $_ = set $persist "storage_options" (dict "client_kwargs" (dict "endpoint_url" .)) -}}
{{- end -}}
{{- $_ = set $cfg "persistence" $persist -}}
{{- if $v.tls.enabled -}}
{{- $tls := dict "cert_file" (printf "%s/tls.crt" (include "ckptd.tlsDir" .)) "key_file" (printf "%s/tls.key" (include "ckptd.tlsDir" .)) "ca_file" (printf "%s/ca.crt" (include "ckptd.tlsDir" .)) -}}
{{- with $v.tls.serverName }}{{ $_ = set $tls "server_name" . }}{{ end -}}
{{- $_ = set $cfg "tls" $tls -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}
