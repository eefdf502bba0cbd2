{{/* Names, labels and the pieces shared by the templates. */}}

{{- define "expertmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The RayService's name; KubeRay derives <name>-head-svc and <name>-serve-svc from it, so it
stays short enough for those. */}}
{{- define "expertmesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "expertmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "expertmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "expertmesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "expertmesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels of the Ray pods (head and workers); KubeRay adds ray.io/node-type, ray.io/serve, ... */}}
{{- define "expertmesh.rayPodLabels" -}}
{{ include "expertmesh.selectorLabels" . }}
app.kubernetes.io/component: ray
{{- end }}

{{- define "expertmesh.redisLabels" -}}
{{ include "expertmesh.selectorLabels" . }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "expertmesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The tool registry file (toolRegistry without secretEnv), empty when it names no server and no
webhook; where the Ray containers see it. */}}
{{- define "expertmesh.toolRegistry" -}}
{{- $r := omit .Values.toolRegistry "secretEnv" }}
{{- if or $r.mcp_servers $r.webhooks }}
{{- toYaml $r }}
{{- end }}
{{- end }}
{{- define "expertmesh.toolRegistryDir" -}}/etc/expertmesh/tools{{- end }}

{{/* Pod annotations: the values' own, and the tool registry's checksum (a changed registry rolls the pods). */}}
{{- define "expertmesh.podAnnotations" -}}
{{- $ann := deepCopy (.annotations | default dict) }}
{{- with include "expertmesh.toolRegistry" .root }}
{{- $_ := set $ann "expertmesh.io/tool-registry-sha256" (sha256sum .) }}
{{- end }}
{{- with $ann }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/* Environment variables through which Secrets reach the Serve replicas (AppConfig's *_env). */}}
{{- define "expertmesh.apiKeysEnv" -}}EXPERTMESH_API_KEYS{{- end }}
{{- define "expertmesh.redisPasswordEnv" -}}EXPERTMESH_REDIS_PASSWORD{{- end }}

{{/* The Secret of the static API keys: existingSecret, or the chart's own (keys given, or one
generated); empty with apiKeys.generate false (the Redis key store is then the only key source). */}}
{{- define "expertmesh.apiKeysSecret" -}}
{{- if .Values.apiKeys.existingSecret }}
{{- .Values.apiKeys.existingSecret }}
{{- else if or .Values.apiKeys.keys .Values.apiKeys.generate }}
{{- include "expertmesh.fullname" . }}-api-keys
{{- end }}
{{- end }}

{{/* Whether the chart generates the API key (no existingSecret, no keys). */}}
{{- define "expertmesh.generatedApiKey" -}}
{{- if and .Values.apiKeys.generate (not .Values.apiKeys.existingSecret) (not .Values.apiKeys.keys) }}true{{ end }}
{{- end }}

{{- define "expertmesh.redisEnabled" -}}
{{- if ne .Values.redis.mode "none" }}true{{ end }}
{{- end }}

{{- define "expertmesh.redisHost" -}}
{{- if eq .Values.redis.mode "bundled" }}
{{- printf "%s-redis.%s.svc" (include "expertmesh.fullname" .) .Release.Namespace }}
{{- else }}
{{- .Values.redis.external.host }}
{{- end }}
{{- end }}

{{- define "expertmesh.redisPort" -}}
{{- if eq .Values.redis.mode "bundled" }}6379{{ else }}{{ .Values.redis.external.port | int }}{{ end }}
{{- end }}

{{- define "expertmesh.redisPasswordSecret" -}}
{{- if and (include "expertmesh.redisEnabled" .) .Values.redis.auth.enabled }}
{{- if .Values.redis.auth.existingSecret }}
{{- .Values.redis.auth.existingSecret }}
{{- else }}
{{- include "expertmesh.fullname" . }}-redis
{{- end }}
{{- end }}
{{- end }}

{{/* Env entries of every Ray container: the Serve proxy's callback (gateway/proxy_callback.py: the
header timeout Serve has no setting for, and OpenAI's error object for the proxy's own answers),
the Secrets as environment variables, then extraEnv. */}}
{{- define "expertmesh.rayEnv" -}}
- name: RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
  value: expertmesh.gateway.proxy_callback:install
- name: EXPERTMESH_HTTP_HEADER_TIMEOUT_S
  value: {{ .Values.app.http_header_timeout_s | default 30 | quote }}
{{- $keys := include "expertmesh.apiKeysSecret" . }}
{{- if $keys }}
- name: {{ include "expertmesh.apiKeysEnv" . }}
  valueFrom:
    secretKeyRef:
      name: {{ $keys }}
      key: {{ .Values.apiKeys.secretKey }}
{{- end }}
{{- $redis := include "expertmesh.redisPasswordSecret" . }}
{{- if $redis }}
- name: {{ include "expertmesh.redisPasswordEnv" . }}
  valueFrom:
    secretKeyRef:
      name: {{ $redis }}
      key: {{ .Values.redis.auth.secretKey }}
{{- end }}
{{- range .Values.toolRegistry.secretEnv }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .key }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* rayEnv and a container's own env (dict "root" $ "env" LIST); empty when there is none. */}}
{{- define "expertmesh.containerEnv" -}}
{{- $env := include "expertmesh.rayEnv" .root | trim }}
{{- with .env }}
{{- $env = printf "%s\n%s" $env (toYaml .) | trim }}
{{- end }}
{{- $env }}
{{- end }}

{{/* Whether the Ray pods use GPUs. */}}
{{- define "expertmesh.gpus" -}}
{{- if gt (int .Values.worker.gpus) 0 }}true{{ end }}
{{- end }}

{{/* The application's args: an AppConfig (gateway/app_config.py), as `expertmesh serve
--print-config` writes them. */}}
{{- define "expertmesh.appArgs" -}}
{{- $args := deepCopy .Values.app }}
{{- $_ := set $args "model" .Values.model.path }}
{{- if not (hasKey $args "device") }}
{{- $_ := set $args "device" (ternary "cuda" "cpu" (eq (include "expertmesh.gpus" .) "true")) }}
{{- end }}
{{- if .Values.grpc.enabled }}
{{- $_ := set $args "grpc_port" (int .Values.grpc.port) }}
{{- $_ := set $args "grpc_host" "0.0.0.0" }}{{/* the pod's every interface, as the HTTP proxy's host */}}
{{- else }}
{{- $_ := set $args "grpc_port" nil }}
{{- end }}
{{- if include "expertmesh.redisEnabled" . }}
{{- $scheme := "redis" }}
{{- $_ := set $args "redis_url" (printf "redis://%s:%s/%d" (include "expertmesh.redisHost" .) (include "expertmesh.redisPort" .) (int .Values.redis.stateDb)) }}
{{- if include "expertmesh.redisPasswordSecret" . }}
{{- $_ := set $args "redis_password_env" (include "expertmesh.redisPasswordEnv" .) }}
{{- end }}
{{- end }}
{{- if include "expertmesh.apiKeysSecret" . }}
{{- $_ := set $args "api_keys_env" (include "expertmesh.apiKeysEnv" .) }}
{{- end }}
{{- if include "expertmesh.toolRegistry" . }}
{{- $_ := set $args "tool_registry" (printf "%s/registry.yaml" (include "expertmesh.toolRegistryDir" .)) }}
{{- end }}
{{- toJson $args }}
{{- end }}

{{/* The Ray Serve config file (the structure of serve_config_file() in gateway/cli.py). */}}
{{- define "expertmesh.serveConfig" -}}
{{- $app := dict "name" "expertmesh" "route_prefix" "/" "import_path" "expertmesh.gateway.serve_app:build_app" "args" (include "expertmesh.appArgs" . | fromJson) }}
{{- /* Deployment options of a config file replace the code's, field by field. */}}
{{- if .Values.gateway.onHead }}
{{- /* the gateway keeps its 0.5 CPU and also needs the head's expertmesh_gateway resource */}}
{{- $gw := dict "name" "ExpertMeshGateway" "ray_actor_options" (dict "num_cpus" 0.5 "resources" (dict "expertmesh_gateway" 0.01)) }}
{{- $_ := set $app "deployments" (list $gw) }}
{{- else }}
{{- /* one gateway replica a pod at most: the replicas spread over the pods, and each pod holding
one serves gRPC on its port (gateway/serve_app.py Gateway) */}}
{{- $gw := dict "name" "ExpertMeshGateway" "max_replicas_per_node" 1 }}
{{- $_ := set $app "deployments" (list $gw) }}
{{- end }}
{{- $http := dict "host" "0.0.0.0" "port" 8000 "keep_alive_timeout_s" (.Values.app.http_keep_alive_timeout_s | default 90 | int) }}
{{- with .Values.app.http_request_timeout_s }}
{{- $_ := set $http "request_timeout_s" . }}
{{- end }}
{{- $cfg := dict "proxy_location" "EveryNode" "http_options" $http "applications" (list $app) }}
{{- toYaml $cfg }}
{{- end }}

{{/* Checks that the schema cannot express (they compare values). */}}
{{- define "expertmesh.validate" -}}
{{- $w := .Values.worker }}
{{- if or (lt (int $w.replicas) (int $w.minReplicas)) (gt (int $w.replicas) (int $w.maxReplicas)) }}
{{- fail (printf "worker.replicas (%d) must lie between worker.minReplicas (%d) and worker.maxReplicas (%d)" (int $w.replicas) (int $w.minReplicas) (int $w.maxReplicas)) }}
{{- end }}
{{- $ep := int (default 1 .Values.app.ep_size) }}
{{- $groups := int (default 1 .Values.app.engine_replicas) }}
{{- if and (include "expertmesh.gpus" .) (gt (mul $ep $groups) (mul (int $w.gpus) (int $w.maxReplicas))) }}
{{- fail (printf "app.ep_size (%d) x app.engine_replicas (%d) needs %d GPUs, but the worker group has at most %d (worker.gpus %d x worker.maxReplicas %d)" $ep $groups (mul $ep $groups) (mul (int $w.gpus) (int $w.maxReplicas)) (int $w.gpus) (int $w.maxReplicas)) }}
{{- end }}
{{- $s := .Values.model.storage }}
{{- if and (ne $s.type "none") (not (hasPrefix (printf "%s/" (trimSuffix "/" $s.mountPath)) .Values.model.path)) }}
{{- fail (printf "model.path (%s) must lie under model.storage.mountPath (%s), where the %s is mounted" .Values.model.path $s.mountPath $s.type) }}
{{- end }}
{{- $gateways := int (default 1 .Values.app.gateway_replicas) }}
{{- if and (not .Values.gateway.onHead) (gt $gateways (add1 (int $w.maxReplicas))) }}
{{- fail (printf "app.gateway_replicas (%d) needs as many Ray pods (one gateway replica a pod), but the head and worker.maxReplicas (%d) make %d; set gateway.onHead to run them all on the head pod" $gateways (int $w.maxReplicas) (add1 (int $w.maxReplicas))) }}
{{- end }}
{{- if and (eq .Values.redis.mode "external") .Values.redis.auth.enabled (not .Values.redis.auth.existingSecret) }}
{{- fail "redis.mode external with redis.auth.enabled needs redis.auth.existingSecret (a Secret holding the password under redis.auth.secretKey)" }}
{{- end }}
{{- if and .Values.apiKeys.existingSecret .Values.apiKeys.keys }}
{{- fail "set apiKeys.existingSecret or apiKeys.keys, not both" }}
{{- end }}
{{- if not (or (include "expertmesh.apiKeysSecret" .) (include "expertmesh.redisEnabled" .)) }}
{{- fail "apiKeys.generate false with no apiKeys.existingSecret, no apiKeys.keys and no Redis key store (redis.mode none) would serve an open API: give keys, or leave apiKeys.generate true" }}
{{- end }}
{{- end }}

{{/* Volumes and mounts of every Ray container. */}}
{{- define "expertmesh.volumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shm }}
{{- $s := .root.Values.model.storage }}
{{- if eq $s.type "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $s.pvc.claimName }}
    readOnly: true
{{- else if eq $s.type "hostPath" }}
- name: model
  hostPath:
    path: {{ $s.hostPath.path }}
    type: {{ $s.hostPath.type }}
{{- end }}
{{- if include "expertmesh.toolRegistry" .root }}
- name: tool-registry
  configMap:
    name: {{ include "expertmesh.fullname" .root }}-tools
{{- end }}
{{- end }}

{{- define "expertmesh.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- if ne .Values.model.storage.type "none" }}
- name: model
  mountPath: {{ .Values.model.storage.mountPath }}
  readOnly: true
{{- end }}
{{- if include "expertmesh.toolRegistry" . }}
- name: tool-registry
  mountPath: {{ include "expertmesh.toolRegistryDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The head container's probe (dict "root" $ "kind" "ready"|"live" "p" .Values.probes.readiness|liveness). */}}
{{- define "expertmesh.probe" -}}
{{- $agent := index .root.Values.head.rayStartParams "dashboard-agent-listen-port" | default 52365 -}}
exec:
  command: [python, -S, /etc/expertmesh/probe/probe.py, {{ .kind }}, --serve-port, "8000", --agent-port, {{ $agent | toString | quote }}, --timeout, {{ divf .p.timeoutSeconds 2.5 | toString | quote }}]
periodSeconds: {{ .p.periodSeconds | int }}
timeoutSeconds: {{ .p.timeoutSeconds | int }}
failureThreshold: {{ .p.failureThreshold | int }}
{{- end }}
