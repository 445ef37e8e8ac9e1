{{/* The one name every object of a release shares: the Service is <release>-keyless-webhook. */}}
{{- define "keyless.fullname" -}}
{{- printf "%s-keyless-webhook" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "keyless.tlsSecretName" -}}
{{- printf "%s-tls" (include "keyless.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The Service's DNS names, as the API server dials it (<svc>.<ns>.svc). */}}
{{- define "keyless.dnsNames" -}}
{{- $svc := include "keyless.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) | toJson -}}
{{- end -}}

{{- define "keyless.selectorLabels" -}}
app.kubernetes.io/name: keyless-webhook
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "keyless.labels" -}}
{{ include "keyless.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: keyless
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* repository:tag, or repository@digest when a digest is given. */}}
{{- define "keyless.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* Never injected: kube-system, the webhook's own namespace, and the values' list. */}}
{{- define "keyless.excludeNamespaces" -}}
{{- concat (list "kube-system" .Release.Namespace) .Values.injection.excludeNamespaces | uniq | toJson -}}
{{- end -}}

{{/* The webhook's config file (keys: the contract of `keyless webhook --config`). */}}
{{- define "keyless.config" -}}
{{- $inj := .Values.injection -}}
{{- /* values.schema.json checks the types and the mode's choices. */ -}}
{{- $config := dict
  "image" ($inj.image | default (include "keyless.image" .))
  "imagePullPolicy" $inj.imagePullPolicy
  "mode" $inj.mode
  "resources" $inj.resources
  "readyScopes" $inj.readyScopes
  "uid" (int $inj.uid)
  "proxyPort" (int $inj.proxyPort)
  "adminPort" (int $inj.adminPort)
  "excludeNamespaces" (include "keyless.excludeNamespaces" . | fromJsonArray)
  "drainTimeout" (int $inj.drainTimeout) -}}
{{- if $inj.catalogConfigMap -}}
{{- $_ := set $config "catalogConfigMap" $inj.catalogConfigMap -}}
{{- end -}}
{{- if $inj.noProxy -}}
{{- $_ := set $config "noProxy" $inj.noProxy -}}
{{- end -}}
{{- if $inj.skipContainers -}}
{{- $_ := set $config "skipContainers" $inj.skipContainers -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}
