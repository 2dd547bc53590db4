{{/* Names, labels and the pieces the RayCluster's head and worker groups share. */}}

{{- define "dvd-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource-name prefix. Kept to 40 characters: KubeRay appends suffixes such as "-head-svc" and pod hashes. */}}
{{- define "dvd-serve.fullname" -}}
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

{{- define "dvd-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dvd-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dvd-serve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "dvd-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "dvd-serve.image" -}}
{{- $image := printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- if .Values.image.digest }}{{ $image = printf "%s@%s" $image .Values.image.digest }}{{ end }}
{{- $image }}
{{- end }}

{{/* Name of the Secret holding the API key; empty when authentication is off. */}}
{{- define "dvd-serve.apiKeySecretName" -}}
{{- if .Values.apiKey.existingSecret }}{{ .Values.apiKey.existingSecret }}
{{- else if .Values.apiKey.create }}{{ include "dvd-serve.fullname" . }}-api-key
{{- end }}
{{- end }}

{{- define "dvd-serve.modelClaimName" -}}
{{- if .Values.model.pvc.create }}{{ include "dvd-serve.fullname" . }}-model{{ else }}{{ .Values.model.pvc.existingClaim }}{{ end }}
{{- end }}

{{/* Settings that cannot be expressed in values.schema.json because they relate several values. */}}
{{- define "dvd-serve.validate" -}}
{{- $mount := printf "%s/" (trimSuffix "/" .Values.model.mountPath) }}
{{- if not (hasPrefix $mount .Values.model.path) }}
{{- fail (printf "model.path %s must lie under model.mountPath %s" .Values.model.path .Values.model.mountPath) }}
{{- end }}
{{- if and (eq .Values.model.source "pvc") (not .Values.model.pvc.create) (not .Values.model.pvc.existingClaim) }}
{{- fail "model.source pvc needs model.pvc.create or model.pvc.existingClaim" }}
{{- end }}
{{- if and .Values.apiKey.create (not .Values.apiKey.value) }}
{{- fail "apiKey.create needs apiKey.value (or set apiKey.existingSecret instead)" }}
{{- end }}
{{- if and .Values.apiKey.create .Values.apiKey.existingSecret }}
{{- fail "set either apiKey.create or apiKey.existingSecret, not both" }}
{{- end }}
{{- range $poolName := list "vision" "language" }}
{{- $pool := index $.Values $poolName }}
{{- if gt (mul (int $pool.replicasPerPod) (int $pool.cpusPerReplica)) (int $pool.cpu) }}
{{- fail (printf "%s: replicasPerPod x cpusPerReplica exceeds cpu" $poolName) }}
{{- end }}
{{- if and (gt (int $pool.gpusPerPod) 0) (ne (mod (int $pool.replicasPerPod) (int $pool.gpusPerPod)) 0) }}
{{- fail (printf "%s: replicasPerPod must be a multiple of gpusPerPod (every GPU holds the same number of replicas)" $poolName) }}
{{- end }}
{{- end }}
{{- if and (gt (int .Values.language.gpusPerPod) 0) (ne (int .Values.language.gpusPerPod) (int .Values.language.replicasPerPod)) }}
{{- fail "language: each replica runs one vLLM engine on one GPU, so replicasPerPod must equal gpusPerPod" }}
{{- end }}
{{- end }}

{{/* Environment of every Ray container: the model is local, and nothing phones home. */}}
{{- define "dvd-serve.commonEnv" -}}
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- end }}

{{- define "dvd-serve.volumes" -}}
{{- $ := index . 0 }}
{{- $shmSize := index . 1 -}}
- name: model
  {{- if eq $.Values.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ include "dvd-serve.modelClaimName" $ }}
    readOnly: true
  {{- else if eq $.Values.model.source "hostPath" }}
  hostPath:
    path: {{ $.Values.model.hostPath.path }}
    type: Directory
  {{- else }}
  emptyDir:
    sizeLimit: {{ $.Values.model.generate.sizeLimit }}
  {{- end }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ $shmSize }}
{{- end }}

{{- define "dvd-serve.volumeMounts" -}}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
- name: dshm
  mountPath: /dev/shm
{{- end }}

{{/* Source `generate`: each pod writes the same seeded random checkpoint into its own emptyDir before Ray starts. */}}
{{- define "dvd-serve.initContainers" -}}
{{- if eq .Values.model.source "generate" }}
{{- $generate := .Values.model.generate }}
initContainers:
  - name: make-checkpoint
    image: {{ include "dvd-serve.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command:
      - dvd-serve
      - make-checkpoint
      - --format={{ $generate.format }}
      - --shape={{ $generate.shape }}
      - --seed={{ $generate.seed }}
      - --dtype={{ $generate.dtype }}
      {{- if $generate.flash }}
      - --flash
      {{- end }}
      - {{ .Values.model.path }}
    resources:
      requests:
        cpu: "1"
        memory: 2Gi
      limits:
        cpu: "1"
        memory: 2Gi
    securityContext:
      {{- toYaml .Values.securityContext | nindent 6 }}
    volumeMounts:
      - name: model
        mountPath: {{ .Values.model.mountPath }}
{{- end }}
{{- end }}

{{/* Pod-level settings every Ray pod shares. */}}
{{- define "dvd-serve.podSpecCommon" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- include "dvd-serve.initContainers" . }}
{{- end }}

{{/* Container resources: requests = limits for CPU, memory and GPUs (the Guaranteed QoS class). */}}
{{- define "dvd-serve.resources" -}}
{{- $ := index . 0 }}
{{- $pool := index . 1 }}
{{- $amounts := dict "cpu" (toString $pool.cpu) "memory" $pool.memory }}
{{- if gt (int (default 0 $pool.gpusPerPod)) 0 }}
{{- $_ := set $amounts $.Values.gpuResourceName (toString $pool.gpusPerPod) }}
{{- end -}}
requests:
  {{- toYaml $amounts | nindent 2 }}
limits:
  {{- toYaml $amounts | nindent 2 }}
{{- end }}

{{/* rayStartParams value of `resources`, in the quoted form KubeRay pastes into `ray start` and Ray's autoscaler
     parses back: "{\"vision_gpu\": 2}". */}}
{{- define "dvd-serve.rayResourcesParam" -}}
{{- $json := printf "{\"%s\": %d}" .rayResource (int .replicasPerPod) }}
{{- printf "\"%s\"" ($json | replace "\"" "\\\"") }}
{{- end }}

{{/* `dvd-serve serve` flags of one pool: the replica count and what each replica asks Ray for. */}}
{{- define "dvd-serve.poolArgs" -}}
{{- $flag := index . 0 }}
{{- $pool := index . 1 }}
{{- $gpusPerReplica := "0" }}
{{- if gt (int $pool.gpusPerPod) 0 }}
{{- $gpusPerReplica = toString (divf $pool.gpusPerPod $pool.replicasPerPod) }}
{{- end }}
--{{ $flag }}-replicas {{ mul $pool.pods $pool.replicasPerPod }} \
--{{ $flag }}-gpus-per-replica {{ $gpusPerReplica }} \
--{{ $flag }}-cpus-per-replica {{ $pool.cpusPerReplica }} \
--{{ $flag }}-resources '{"{{ $pool.rayResource }}": 1}' \
{{- end }}
