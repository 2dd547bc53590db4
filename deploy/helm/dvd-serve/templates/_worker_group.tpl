{{/* One Ray worker group (vision or language): list ROOT GROUP-NAME POOL-VALUES. */}}
{{- define "dvd-serve.workerGroup" -}}
{{- $ := index . 0 }}
{{- $group := index . 1 }}
{{- $pool := index . 2 -}}
- groupName: {{ $group }}
  replicas: {{ $pool.pods }}
  minReplicas: {{ $pool.pods }}
  maxReplicas: {{ $pool.pods }}
  # Ray sees exactly what Kubernetes grants: num-cpus = the CPU limit, num-gpus = the GPU limit, and one unit of
  # the pool's custom resource per replica slot.
  rayStartParams:
    num-cpus: {{ $pool.cpu | quote }}
    num-gpus: {{ $pool.gpusPerPod | quote }}
    resources: {{ include "dvd-serve.rayResourcesParam" $pool | squote }}
    node-manager-port: {{ $.Values.ray.nodeManagerPort | quote }}
  template:
    metadata:
      labels:
        {{- include "dvd-serve.selectorLabels" $ | nindent 8 }}
        app.kubernetes.io/component: {{ $group }}
        {{- with $pool.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $pool.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- include "dvd-serve.podSpecCommon" $ | nindent 6 }}
      {{- with $pool.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $pool.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $pool.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "dvd-serve.image" $ }}
          imagePullPolicy: {{ $.Values.image.pullPolicy }}
          command: ["/bin/bash", "-c", "--"]
          # eval, not a bare expansion: the generated command carries the quoted --resources JSON.
          args:
            - |
              ulimit -n "$(ulimit -Hn)"
              : "${KUBERAY_GEN_RAY_START_CMD:?is set by the KubeRay operator (>= 1.1)}"
              eval "$KUBERAY_GEN_RAY_START_CMD"
          env:
            {{- include "dvd-serve.commonEnv" $ | nindent 12 }}
            {{- with $pool.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          resources:
            {{- include "dvd-serve.resources" (list $ $pool) | nindent 12 }}
          # `ray start --block` exits when the raylet dies, which restarts the container; these probes cover a
          # raylet that hangs. The raylet port is fixed (ray.nodeManagerPort) so a TCP check needs no tool in the image.
          startupProbe:
            tcpSocket:
              port: {{ $.Values.ray.nodeManagerPort }}
            periodSeconds: 5
            failureThreshold: 60
          readinessProbe:
            tcpSocket:
              port: {{ $.Values.ray.nodeManagerPort }}
            periodSeconds: 10
            failureThreshold: 3
          livenessProbe:
            tcpSocket:
              port: {{ $.Values.ray.nodeManagerPort }}
            periodSeconds: 20
            failureThreshold: 3
          securityContext:
            {{- toYaml $.Values.securityContext | nindent 12 }}
          volumeMounts:
            {{- include "dvd-serve.volumeMounts" $ | nindent 12 }}
      volumes:
        {{- include "dvd-serve.volumes" (list $ $pool.shmSize) | nindent 8 }}
{{- end }}
