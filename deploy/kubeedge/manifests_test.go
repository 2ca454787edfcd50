// Package kubeedge_test checks the KubeEdge manifests against the Kubernetes
// API types and against the binaries they run: every manifest decodes
// strictly (a misspelt field fails), the kustomization lists every file and
// its generators' sources exist, and every container's flags, ports, probes
// and mounted paths agree with what cmd/edge and cmd/cloud-sync accept.
package kubeedge_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"

	"github.com/outpost-edge/outpost/pkg/cloud"
	"github.com/outpost-edge/outpost/pkg/edge"
)

const root = "../.."

// kustomization is the subset of kustomize's Kustomization these manifests
// use; decoding is strict, so a field outside it fails the test instead of
// being silently ignored.
type kustomization struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Namespace  string `json:"namespace,omitempty"`
	Labels     []struct {
		Pairs            map[string]string `json:"pairs"`
		IncludeSelectors bool              `json:"includeSelectors,omitempty"`
		IncludeTemplates bool              `json:"includeTemplates,omitempty"`
	} `json:"labels,omitempty"`
	Resources          []string `json:"resources,omitempty"`
	ConfigMapGenerator []struct {
		Name    string   `json:"name"`
		Files   []string `json:"files"`
		Options *struct {
			DisableNameSuffixHash bool `json:"disableNameSuffixHash,omitempty"`
		} `json:"options,omitempty"`
	} `json:"configMapGenerator,omitempty"`
	Images []struct {
		Name    string `json:"name"`
		NewName string `json:"newName,omitempty"`
		NewTag  string `json:"newTag,omitempty"`
	} `json:"images,omitempty"`
}

func strictYAML(t *testing.T, name string, doc []byte, into any) {
	t.Helper()
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	dec := json.NewDecoder(bytes.NewReader(j))
	dec.DisallowUnknownFields()
	if err := dec.Decode(into); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
}

func loadKustomization(t *testing.T, dir string) kustomization {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var k kustomization
	strictYAML(t, filepath.Join(dir, "kustomization.yaml"), b, &k)
	if k.APIVersion != "kustomize.config.k8s.io/v1beta1" || k.Kind != "Kustomization" {
		t.Fatalf("%s: apiVersion/kind = %s/%s", dir, k.APIVersion, k.Kind)
	}
	return k
}

// manifests is everything the kustomization renders, decoded into API types.
type manifests struct {
	namespace    string
	deployments  []*appsv1.Deployment
	statefulSets []*appsv1.StatefulSet
	services     []*corev1.Service
	secrets      []*corev1.Secret
	pdbs         []*policyv1.PodDisruptionBudget
	namespaces   []*corev1.Namespace
	configMaps   map[string][]string // generated ConfigMap name → keys
}

var docSep = regexp.MustCompile(`(?m)^---\s*$`)

func load(t *testing.T) *manifests {
	t.Helper()
	k := loadKustomization(t, ".")
	m := &manifests{namespace: k.Namespace, configMaps: map[string][]string{}}

	// Every YAML file here is a resource, and every resource exists.
	files, _ := filepath.Glob("*.yaml")
	for _, f := range files {
		if f != "kustomization.yaml" && !slices.Contains(k.Resources, f) {
			t.Errorf("%s is not listed in kustomization.yaml resources", f)
		}
	}
	for _, r := range k.Resources {
		fi, err := os.Stat(r)
		if err != nil {
			t.Errorf("resource %s: %v", r, err)
			continue
		}
		if fi.IsDir() {
			sub := loadKustomization(t, r)
			if len(sub.Resources) > 0 {
				t.Errorf("%s: only generators expected in a sub-kustomization", r)
			}
			for _, g := range sub.ConfigMapGenerator {
				for _, f := range g.Files {
					if _, err := os.Stat(filepath.Join(r, f)); err != nil {
						t.Errorf("%s: configMapGenerator %s: %v", r, g.Name, err)
					}
					m.configMaps[g.Name] = append(m.configMaps[g.Name], filepath.Base(f))
				}
			}
			continue
		}
		raw, err := os.ReadFile(r)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range docSep.Split(string(raw), -1) {
			if strings.TrimSpace(stripComments(doc)) == "" {
				continue
			}
			m.decode(t, fmt.Sprintf("%s#%d", r, i), []byte(doc))
		}
	}
	return m
}

func stripComments(doc string) string {
	var b strings.Builder
	for _, l := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

// decodeInto strictly decodes doc as a T and appends it to list.
func decodeInto[T any](t *testing.T, name string, doc []byte, list *[]*T) {
	t.Helper()
	o := new(T)
	strictYAML(t, name, doc, o)
	*list = append(*list, o)
}

func (m *manifests) decode(t *testing.T, name string, doc []byte) {
	t.Helper()
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal(doc, &tm); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	switch tm.APIVersion + "/" + tm.Kind {
	case "apps/v1/Deployment":
		decodeInto(t, name, doc, &m.deployments)
	case "apps/v1/StatefulSet":
		decodeInto(t, name, doc, &m.statefulSets)
	case "v1/Service":
		decodeInto(t, name, doc, &m.services)
	case "v1/Secret":
		decodeInto(t, name, doc, &m.secrets)
	case "v1/Namespace":
		decodeInto(t, name, doc, &m.namespaces)
	case "policy/v1/PodDisruptionBudget":
		decodeInto(t, name, doc, &m.pdbs)
	default:
		t.Fatalf("%s: unexpected %s %s (teach the test about it)", name, tm.APIVersion, tm.Kind)
	}
}

func (m *manifests) service(name string) *corev1.Service {
	for _, s := range m.services {
		if s.Name == name {
			return s
		}
	}
	return nil
}

// secretKeys lists the keys of the Secret name.
func (m *manifests) secretKeys(name string) []string {
	var keys []string
	for _, s := range m.secrets {
		if s.Name == name {
			for k := range s.StringData {
				keys = append(keys, k)
			}
			for k := range s.Data {
				keys = append(keys, k)
			}
		}
	}
	slices.Sort(keys)
	return keys
}

// hasSecret reports whether the kustomization defines the Secret.
func (m *manifests) hasSecret(name string) bool {
	return slices.ContainsFunc(m.secrets, func(s *corev1.Secret) bool { return s.Name == name })
}

func (m *manifests) secretKey(name, key string) bool {
	for _, s := range m.secrets {
		if s.Name == name {
			_, a := s.StringData[key]
			_, b := s.Data[key]
			return a || b
		}
	}
	return false
}

// --- the binaries' flags ---

var bins struct {
	once  sync.Once
	flags map[string]map[string]bool // binary → flag names from -h
	err   error
}

var helpFlag = regexp.MustCompile(`(?m)^\s+-([a-zA-Z0-9][a-zA-Z0-9-]*)`)

// binaryFlags builds cmd/edge and cmd/cloud-sync and reads the flag names
// from their -h output.
func binaryFlags(t *testing.T) map[string]map[string]bool {
	t.Helper()
	bins.once.Do(func() {
		dir, err := os.MkdirTemp("", "outpost-deploy-test-")
		if err != nil {
			bins.err = err
			return
		}
		defer os.RemoveAll(dir)
		bins.flags = map[string]map[string]bool{}
		for _, b := range []string{"edge", "cloud-sync"} {
			out := filepath.Join(dir, b)
			cmd := exec.Command("go", "build", "-o", out, "./cmd/"+b)
			cmd.Dir = root
			if o, err := cmd.CombinedOutput(); err != nil {
				bins.err = fmt.Errorf("go build ./cmd/%s: %v\n%s", b, err, o)
				return
			}
			var help bytes.Buffer
			h := exec.Command(out, "-h")
			h.Stdout, h.Stderr = &help, &help
			if err := h.Run(); err != nil {
				bins.err = fmt.Errorf("%s -h: %v\n%s", b, err, help.String())
				return
			}
			set := map[string]bool{}
			for _, m := range helpFlag.FindAllStringSubmatch(help.String(), -1) {
				set[m[1]] = true
			}
			if len(set) < 5 {
				bins.err = fmt.Errorf("%s -h: found only %v in:\n%s", b, set, help.String())
				return
			}
			bins.flags[b] = set
		}
	})
	if bins.err != nil {
		t.Fatal(bins.err)
	}
	return bins.flags
}

// --- containers ---

// binaryOf names the binary an image runs.
func binaryOf(t *testing.T, image string) string {
	t.Helper()
	name, _, _ := strings.Cut(image, ":")
	switch name {
	case "outpost/edge":
		return "edge"
	case "outpost/cloud-sync":
		return "cloud-sync"
	}
	t.Fatalf("image %q is neither outpost/edge nor outpost/cloud-sync", image)
	return ""
}

// flagArgs splits args of the form -name=value (the only form the manifests
// use, so that a value can never be mistaken for a flag) into name → values.
func flagArgs(t *testing.T, who string, args []string, known map[string]bool) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	for _, a := range args {
		name, val, ok := strings.Cut(strings.TrimPrefix(a, "-"), "=")
		if !strings.HasPrefix(a, "-") || strings.HasPrefix(a, "--") || !ok {
			t.Errorf("%s: arg %q: write flags as -name=value", who, a)
			continue
		}
		if !known[name] {
			t.Errorf("%s: flag -%s is not accepted by the binary", who, name)
		}
		out[name] = append(out[name], val)
	}
	return out
}

var envRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// expand substitutes $(VAR) the way the kubelet does, with stand-in values
// for the downward API and secrets. An undefined variable is an error: the
// kubelet would pass "$(VAR)" through literally.
func expand(t *testing.T, who string, args []string, c corev1.Container, podName string, m *manifests) []string {
	t.Helper()
	vals := map[string]string{}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom == nil:
			vals[e.Name] = e.Value
		case e.ValueFrom.FieldRef != nil:
			switch e.ValueFrom.FieldRef.FieldPath {
			case "metadata.name":
				vals[e.Name] = podName
			case "metadata.namespace":
				vals[e.Name] = m.namespace
			case "status.hostIP", "status.podIP":
				vals[e.Name] = "10.1.2.3"
			default:
				t.Errorf("%s: env %s: unexpected fieldRef %s", who, e.Name, e.ValueFrom.FieldRef.FieldPath)
			}
		case e.ValueFrom.SecretKeyRef != nil:
			r := e.ValueFrom.SecretKeyRef
			if !m.secretKey(r.Name, r.Key) {
				t.Errorf("%s: env %s: secret %s has no key %s", who, e.Name, r.Name, r.Key)
			}
			vals[e.Name] = "secret-" + r.Key
		case e.ValueFrom.ResourceFieldRef != nil:
			vals[e.Name] = "536870912"
		default:
			t.Errorf("%s: env %s: unsupported valueFrom", who, e.Name)
		}
	}
	out := make([]string, len(args))
	for i, a := range args {
		out[i] = envRef.ReplaceAllStringFunc(a, func(ref string) string {
			name := ref[2 : len(ref)-1]
			v, ok := vals[name]
			if !ok {
				t.Errorf("%s: %q refers to $(%s), which the container's env does not define", who, a, name)
			}
			return v
		})
	}
	return out
}

func port(t *testing.T, who, addr string) int32 {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("%s: address %q: %v", who, addr, err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatalf("%s: address %q: %v", who, addr, err)
	}
	return int32(n)
}

func containerPort(c corev1.Container, name string) *corev1.ContainerPort {
	for i := range c.Ports {
		if c.Ports[i].Name == name {
			return &c.Ports[i]
		}
	}
	return nil
}

// probePort resolves a probe's port (by name or number) to a number.
func probePort(c corev1.Container, p intstr.IntOrString) int32 {
	if p.Type == intstr.Int {
		return p.IntVal
	}
	if cp := containerPort(c, p.StrVal); cp != nil {
		return cp.ContainerPort
	}
	return -1
}

// mountFor returns the volume mounted at exactly path, or at a parent of
// it, and the mount's path.
func mountFor(c corev1.Container, path string) (corev1.VolumeMount, bool) {
	for _, vm := range c.VolumeMounts {
		if path == vm.MountPath || strings.HasPrefix(path, strings.TrimSuffix(vm.MountPath, "/")+"/") {
			return vm, true
		}
	}
	return corev1.VolumeMount{}, false
}

func volume(spec corev1.PodSpec, name string) *corev1.Volume {
	for i := range spec.Volumes {
		if spec.Volumes[i].Name == name {
			return &spec.Volumes[i]
		}
	}
	return nil
}

// checkPod holds for every pod: probes on the HTTP port, resources,
// non-root, config mounted from the generated ConfigMap, a grace period
// longer than the daemon's own.
func checkPod(t *testing.T, who string, spec corev1.PodSpec, c corev1.Container, flags map[string][]string, m *manifests) {
	t.Helper()
	httpPort := port(t, who, flags["http"][0])
	if cp := containerPort(c, "http"); cp == nil || cp.ContainerPort != httpPort {
		t.Errorf("%s: container port \"http\" must be %d (-http=%s)", who, httpPort, flags["http"][0])
	}
	for _, p := range []struct {
		probe *corev1.Probe
		kind  string
		path  string
	}{{c.LivenessProbe, "liveness", "/healthz"}, {c.ReadinessProbe, "readiness", "/readyz"}} {
		if p.probe == nil || p.probe.HTTPGet == nil {
			t.Errorf("%s: needs an HTTP %s probe", who, p.kind)
			continue
		}
		if p.probe.HTTPGet.Path != p.path {
			t.Errorf("%s: %s probe path %s, want %s", who, p.kind, p.probe.HTTPGet.Path, p.path)
		}
		if got := probePort(c, p.probe.HTTPGet.Port); got != httpPort {
			t.Errorf("%s: %s probe port %d, want the HTTP port %d", who, p.kind, got, httpPort)
		}
	}
	for _, ct := range append(slices.Clone(spec.InitContainers), c) {
		for _, r := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
			if _, ok := ct.Resources.Requests[r]; !ok {
				t.Errorf("%s/%s: no %s request", who, ct.Name, r)
			}
			if _, ok := ct.Resources.Limits[r]; !ok {
				t.Errorf("%s/%s: no %s limit", who, ct.Name, r)
			}
		}
	}
	if sc := spec.SecurityContext; sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot || sc.RunAsUser == nil || *sc.RunAsUser != 65532 {
		t.Errorf("%s: pod must run as non-root user 65532 (the image's USER)", who)
	}

	// -config: a key of the generated ConfigMap, mounted where the flag says.
	cfgPath := flags["config"][0]
	vm, ok := mountFor(c, cfgPath)
	if !ok {
		t.Errorf("%s: -config=%s is not on a mounted volume", who, cfgPath)
	} else if v := volume(spec, vm.Name); v == nil || v.ConfigMap == nil {
		t.Errorf("%s: -config=%s must come from a ConfigMap volume", who, cfgPath)
	} else if keys, ok := m.configMaps[v.ConfigMap.Name]; !ok || !slices.Contains(keys, filepath.Base(cfgPath)) {
		t.Errorf("%s: ConfigMap %s (generated: %v) has no key %s", who, v.ConfigMap.Name, keys, filepath.Base(cfgPath))
	}

	// -shutdown-grace below the kubelet's SIGKILL.
	grace, err := time.ParseDuration(flags["shutdown-grace"][0])
	if err != nil || spec.TerminationGracePeriodSeconds == nil ||
		time.Duration(*spec.TerminationGracePeriodSeconds)*time.Second < grace+5*time.Second {
		t.Errorf("%s: terminationGracePeriodSeconds must exceed -shutdown-grace=%s by 5s or more", who, flags["shutdown-grace"])
	}
}

// checkSecretFile holds for the certificates and keys a daemon reads:
// path is a file of a mounted Secret volume (created per deployment, so
// the test cannot see its keys; it checks the file name is one the volume
// provides).
func checkSecretFile(t *testing.T, who, flag string, spec corev1.PodSpec, c corev1.Container, path string) {
	t.Helper()
	vm, ok := mountFor(c, path)
	if !ok {
		t.Errorf("%s: -%s=%s is not on a mounted volume", who, flag, path)
		return
	}
	v := volume(spec, vm.Name)
	if v == nil || v.Secret == nil {
		t.Errorf("%s: -%s=%s must come from a Secret volume", who, flag, path)
		return
	}
	rel := strings.TrimPrefix(path, strings.TrimSuffix(vm.MountPath, "/")+"/")
	if len(v.Secret.Items) > 0 && !slices.ContainsFunc(v.Secret.Items, func(k corev1.KeyToPath) bool { return k.Path == rel }) {
		t.Errorf("%s: -%s=%s: Secret %s's items do not provide %s", who, flag, path, v.Secret.SecretName, rel)
	}
	if !vm.ReadOnly {
		t.Errorf("%s: the volume of -%s must be mounted read-only", who, flag)
	}
}

// requireFlags fails unless every name is given.
func requireFlags(t *testing.T, who string, flags map[string][]string, names ...string) bool {
	t.Helper()
	ok := true
	for _, n := range names {
		if len(flags[n]) == 0 {
			t.Errorf("%s: -%s is required", who, n)
			ok = false
		}
	}
	return ok
}

// fakeSecret stands in for the value of a Secret key: long enough for the
// daemons' checks, and naming its key so a test can tell which it got.
func fakeSecret(key string) string { return "secret-" + key + "-0123456789abcdef0123456789abcdef" }

// secretFiles writes what the container's Secret volumes would hold
// (fakeSecret of each key, in the volume's mode) into temporary
// directories, and returns args with those mount paths rewritten to them,
// and the Secret key behind each in-container file path.
func secretFiles(t *testing.T, who string, spec corev1.PodSpec, c corev1.Container, m *manifests, args []string) ([]string, map[string]string) {
	t.Helper()
	keyOf := map[string]string{}
	out := slices.Clone(args)
	for _, vm := range c.VolumeMounts {
		v := volume(spec, vm.Name)
		if v == nil || v.Secret == nil || !m.hasSecret(v.Secret.SecretName) {
			// The TLS Secrets are made per deployment, outside the
			// kustomization; checkSecretFile checks their mounts.
			continue
		}
		dir := t.TempDir()
		items := v.Secret.Items
		if len(items) == 0 {
			for _, k := range m.secretKeys(v.Secret.SecretName) {
				items = append(items, corev1.KeyToPath{Key: k, Path: k})
			}
		}
		mode := os.FileMode(0o644) // the kubelet's default
		if v.Secret.DefaultMode != nil {
			mode = os.FileMode(*v.Secret.DefaultMode)
		}
		for _, it := range items {
			if !m.secretKey(v.Secret.SecretName, it.Key) {
				t.Errorf("%s: volume %s: secret %s has no key %s", who, vm.Name, v.Secret.SecretName, it.Key)
				continue
			}
			p := filepath.Join(dir, filepath.FromSlash(it.Path))
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, []byte(fakeSecret(it.Key)+"\n"), mode); err != nil {
				t.Fatal(err)
			}
			keyOf[strings.TrimSuffix(vm.MountPath, "/")+"/"+it.Path] = it.Key
		}
		for i, a := range out {
			name, val, ok := strings.Cut(a, "=")
			if rest, under := strings.CutPrefix(val, strings.TrimSuffix(vm.MountPath, "/")); ok && under && (rest == "" || rest[0] == '/') {
				out[i] = name + "=" + dir + rest
			}
		}
	}
	return out, keyOf
}

// repoConfig swaps an in-container -config path for the repository file the
// ConfigMap is generated from, to parse the command line in-process.
func repoConfig(args []string) []string {
	out := slices.Clone(args)
	for i, a := range out {
		if v, ok := strings.CutPrefix(a, "-config="); ok {
			out[i] = "-config=" + filepath.Join(root, "configs", filepath.Base(v))
		}
	}
	return out
}

func TestManifests(t *testing.T) {
	m := load(t)
	flagsOf := binaryFlags(t)
	if len(m.namespaces) != 1 || m.namespaces[0].Name != m.namespace {
		t.Errorf("want one Namespace named %q (the kustomization's namespace)", m.namespace)
	}
	for _, name := range []string{"outpost-config", "outpost-policies"} {
		if _, ok := m.configMaps[name]; !ok {
			t.Errorf("no ConfigMap %s generated", name)
		}
	}
	// Every non-test policy ships in the policies ConfigMap.
	rego, _ := filepath.Glob(filepath.Join(root, "policies", "*.rego"))
	for _, f := range rego {
		if b := filepath.Base(f); !strings.HasSuffix(b, "_test.rego") && !slices.Contains(m.configMaps["outpost-policies"], b) {
			t.Errorf("policy %s is missing from the outpost-policies ConfigMap", b)
		}
	}

	edgeTokens := map[string]string{} // edge id → secret key of its -cloud-token
	t.Run("edge", func(t *testing.T) {
		if len(m.deployments) == 0 {
			t.Fatal("no edge Deployment")
		}
		for _, d := range m.deployments {
			who := "Deployment/" + d.Name
			spec := d.Spec.Template.Spec
			if len(spec.Containers) != 1 {
				t.Fatalf("%s: want one container", who)
			}
			c := spec.Containers[0]
			if binaryOf(t, c.Image) != "edge" {
				t.Fatalf("%s: not an edge", who)
			}
			if d.Spec.Replicas == nil || *d.Spec.Replicas != 1 || d.Spec.Strategy.Type != appsv1.RecreateDeploymentStrategyType {
				t.Errorf("%s: an edge owns a bbolt store and host ports: want replicas 1 and strategy Recreate", who)
			}
			args := expand(t, who, c.Args, c, d.Name+"-abc12", m)
			flags := flagArgs(t, who, args, flagsOf["edge"])
			if !requireFlags(t, who, flags, "config", "id", "data", "policies", "http", "mqtt-listen", "shutdown-grace", "cloud", "cloud-token-file") {
				continue
			}
			withFiles, keyOf := secretFiles(t, who, spec, c, m, args)
			cfg, err := edge.Parse(repoConfig(withFiles), io.Discard)
			if err != nil {
				t.Errorf("%s: the edge refuses its command line: %v", who, err)
				continue
			}
			checkPod(t, who, spec, c, flags, m)
			if strings.HasPrefix(cfg.Cloud.URLs[0], "https://") {
				if !requireFlags(t, who, flags, "cloud-ca") {
					continue
				}
				checkSecretFile(t, who, "cloud-ca", spec, c, cfg.Cloud.CA)
			}

			// KubeEdge edge nodes only, with the matching toleration.
			if _, ok := spec.NodeSelector["node-role.kubernetes.io/edge"]; !ok {
				t.Errorf("%s: nodeSelector lacks node-role.kubernetes.io/edge", who)
			}
			if !slices.ContainsFunc(spec.Tolerations, func(tl corev1.Toleration) bool {
				return tl.Key == "node-role.kubernetes.io/edge" && (tl.Operator == corev1.TolerationOpExists || tl.Operator == "")
			}) {
				t.Errorf("%s: no toleration for node-role.kubernetes.io/edge", who)
			}
			// Devices publish to host port 1883 on the embedded broker.
			mp := containerPort(c, "mqtt")
			if mp == nil || mp.ContainerPort != port(t, who, cfg.MQTT.Listen) || mp.HostPort != 1883 {
				t.Errorf("%s: want container port \"mqtt\" = -mqtt-listen port with hostPort 1883, got %+v", who, mp)
			}
			// Data on a hostPath at -data; policies from their ConfigMap at -policies.
			if vm, ok := mountFor(c, cfg.DataDir); !ok || vm.MountPath != cfg.DataDir || vm.ReadOnly {
				t.Errorf("%s: -data=%s must be a writable mount", who, cfg.DataDir)
			} else if v := volume(spec, vm.Name); v == nil || v.HostPath == nil {
				t.Errorf("%s: the data volume must be a hostPath", who)
			}
			if vm, ok := mountFor(c, cfg.Policy.Dir); !ok || vm.MountPath != cfg.Policy.Dir {
				t.Errorf("%s: -policies=%s is not mounted", who, cfg.Policy.Dir)
			} else if v := volume(spec, vm.Name); v == nil || v.ConfigMap == nil || v.ConfigMap.Name != "outpost-policies" {
				t.Errorf("%s: -policies must be the outpost-policies ConfigMap", who)
			}
			if cfg.DevLogin {
				t.Errorf("%s: dev login must be off in a deployment", who)
			}
			// The cloud URL names the consumer Service on its port.
			for _, raw := range cfg.Cloud.URLs {
				u, err := url.Parse(raw)
				if err != nil {
					t.Errorf("%s: -cloud %q: %v", who, raw, err)
					continue
				}
				svc := m.service(strings.Split(u.Hostname(), ".")[0])
				if svc == nil || len(svc.Spec.Ports) == 0 || strconv.Itoa(int(svc.Spec.Ports[0].Port)) != u.Port() {
					t.Errorf("%s: -cloud %s does not match a Service and its port", who, raw)
				}
			}
			if key, ok := keyOf[flags["cloud-token-file"][0]]; !ok {
				t.Errorf("%s: -cloud-token-file must be a file of a mounted Secret", who)
			} else if cfg.Cloud.Token != fakeSecret(key) {
				t.Errorf("%s: the edge read cloud token %q, want the Secret key %s's", who, cfg.Cloud.Token, key)
			} else {
				edgeTokens[cfg.ID] = key
			}
		}
	})

	t.Run("cloud-sync", func(t *testing.T) {
		if len(m.statefulSets) != 1 {
			t.Fatalf("want one cloud-sync StatefulSet, have %d", len(m.statefulSets))
		}
		s := m.statefulSets[0]
		who := "StatefulSet/" + s.Name
		spec := s.Spec.Template.Spec
		c := spec.Containers[0]
		if binaryOf(t, c.Image) != "cloud-sync" {
			t.Fatalf("%s: not cloud-sync", who)
		}
		if s.Spec.Replicas == nil || *s.Spec.Replicas != 3 {
			t.Fatalf("%s: want 3 replicas", who)
		}
		replicas := int(*s.Spec.Replicas)
		if s.Spec.PodManagementPolicy != appsv1.ParallelPodManagement {
			t.Errorf("%s: podManagementPolicy must be Parallel: after a full stop no pod is ready until a quorum runs", who)
		}
		svc := m.service(s.Spec.ServiceName)
		if svc == nil || svc.Spec.ClusterIP != corev1.ClusterIPNone || !svc.Spec.PublishNotReadyAddresses {
			t.Fatalf("%s: serviceName %q must be a headless Service publishing not-ready addresses", who, s.Spec.ServiceName)
		}
		podLabels := s.Spec.Template.Labels
		for k, v := range s.Spec.Selector.MatchLabels {
			if podLabels[k] != v {
				t.Errorf("%s: selector %s=%s does not match the pod labels", who, k, v)
			}
		}
		// The three members' stable names.
		stable := func(pod string, p int32) string {
			return fmt.Sprintf("%s.%s.%s.svc.cluster.local:%d", pod, svc.Name, m.namespace, p)
		}
		for ord := 0; ord < replicas; ord++ {
			pod := fmt.Sprintf("%s-%d", s.Name, ord)
			pw := fmt.Sprintf("%s (pod %s)", who, pod)
			args := expand(t, pw, c.Args, c, pod, m)
			flags := flagArgs(t, pw, args, flagsOf["cloud-sync"])
			if !requireFlags(t, pw, flags, "config", "id", "data", "http", "http-advertise", "raft", "raft-advertise", "bootstrap-node", "join", "api-token-file", "edge-tokens-file", "shutdown-grace") {
				return
			}
			withFiles, keyOf := secretFiles(t, pw, spec, c, m, args)
			cfg, err := cloud.Parse(repoConfig(withFiles), io.Discard)
			if err != nil {
				t.Fatalf("%s: cloud-sync refuses its command line: %v", pw, err)
			}
			if ord == 0 {
				checkPod(t, who, spec, c, flags, m)
				// Off loopback, raft runs over mutual TLS (Parse refuses
				// it otherwise); its files come from a Secret, and the
				// HTTP port is then https, probes included.
				for flag, path := range map[string]string{"cluster-ca": cfg.ClusterCA, "cluster-cert": cfg.ClusterCert,
					"cluster-key": cfg.ClusterKey, "tls-cert": cfg.TLSCert, "tls-key": cfg.TLSKey} {
					if path != "" {
						checkSecretFile(t, who, flag, spec, c, path)
					}
				}
				if cfg.HTTPTLS() {
					for _, p := range []*corev1.Probe{c.StartupProbe, c.LivenessProbe, c.ReadinessProbe} {
						if p != nil && p.HTTPGet != nil && p.HTTPGet.Scheme != corev1.URISchemeHTTPS {
							t.Errorf("%s: the HTTP port serves TLS: probe %s needs scheme HTTPS", who, p.HTTPGet.Path)
						}
					}
				}
			}
			if cfg.ID != pod {
				t.Errorf("%s: id %s, want the pod name", pw, cfg.ID)
			}
			httpPort, raftPort := port(t, pw, cfg.HTTP), port(t, pw, cfg.Raft)
			if rp := containerPort(c, "raft"); rp == nil || rp.ContainerPort != raftPort {
				t.Errorf("%s: container port \"raft\" must be %d", pw, raftPort)
			}
			if cfg.HTTPAdvertise != stable(pod, httpPort) || cfg.RaftAdvertise != stable(pod, raftPort) {
				t.Errorf("%s: advertise %s / %s, want the stable names %s / %s", pw,
					cfg.HTTPAdvertise, cfg.RaftAdvertise, stable(pod, httpPort), stable(pod, raftPort))
			}
			wantBoot := ord == 0
			if cfg.Bootstrap != wantBoot || (wantBoot != (len(cfg.Join) == 0)) {
				t.Errorf("%s: bootstrap=%v join=%v: want exactly %s-0 to bootstrap and the others to join", pw, cfg.Bootstrap, cfg.Join, s.Name)
			}
			if !wantBoot {
				var want []string
				for o := 0; o < replicas; o++ {
					if o != ord {
						scheme := "http://"
						if cfg.HTTPTLS() {
							scheme = "https://"
						}
						want = append(want, scheme+stable(fmt.Sprintf("%s-%d", s.Name, o), httpPort))
					}
				}
				if !slices.Equal(cfg.Join, want) {
					t.Errorf("%s: joins %v, want the other members' stable URLs %v", pw, cfg.Join, want)
				}
			}
			if key, ok := keyOf[flags["api-token-file"][0]]; !ok || cfg.APIToken != fakeSecret(key) {
				t.Errorf("%s: -api-token-file must be a file of a mounted Secret (read %q)", pw, cfg.APIToken)
			}
			for id, key := range edgeTokens {
				if cfg.EdgeTokens[id] != fakeSecret(key) {
					t.Errorf("%s: edge %s must be accepted with the Secret key %s its Deployment sends", pw, id, key)
				}
			}
			if len(cfg.EdgeTokens) != len(edgeTokens) {
				t.Errorf("%s: edge tokens for %v, but the edges are %v", pw, cfg.EdgeTokens, edgeTokens)
			}
			if cfg.DevLogin {
				t.Errorf("%s: dev login must be off", pw)
			}
			// -data on the volumeClaimTemplate.
			vm, ok := mountFor(c, cfg.Data)
			if !ok || vm.MountPath != cfg.Data || !slices.ContainsFunc(s.Spec.VolumeClaimTemplates, func(p corev1.PersistentVolumeClaim) bool {
				return p.Name == vm.Name
			}) {
				t.Errorf("%s: -data=%s must be a volumeClaimTemplate mount", pw, cfg.Data)
			}
			// Headless Service ports match the flags.
			for _, sp := range svc.Spec.Ports {
				if cp := containerPort(c, sp.TargetPort.StrVal); cp == nil || cp.ContainerPort != sp.Port {
					t.Errorf("Service/%s: port %s (%d) does not match the container's", svc.Name, sp.Name, sp.Port)
				}
			}
		}
		// A quorum survives voluntary disruptions.
		found := false
		for _, p := range m.pdbs {
			sel, err := metav1.LabelSelectorAsSelector(p.Spec.Selector)
			if err != nil || !sel.Matches(labels.Set(podLabels)) {
				continue
			}
			found = true
			if p.Spec.MinAvailable == nil || p.Spec.MinAvailable.IntValue() != replicas/2+1 {
				t.Errorf("PodDisruptionBudget/%s: minAvailable must be the quorum %d", p.Name, replicas/2+1)
			}
		}
		if !found {
			t.Errorf("no PodDisruptionBudget selects the cloud-sync pods")
		}
	})

	t.Run("services", func(t *testing.T) {
		consumers := false
		for _, svc := range m.services {
			var pods []corev1.PodTemplateSpec
			for _, d := range m.deployments {
				pods = append(pods, d.Spec.Template)
			}
			for _, s := range m.statefulSets {
				pods = append(pods, s.Spec.Template)
			}
			matched := false
			for _, p := range pods {
				if matches(svc.Spec.Selector, p.Labels) {
					matched = true
					for _, sp := range svc.Spec.Ports {
						if containerPort(p.Spec.Containers[0], sp.TargetPort.StrVal) == nil {
							t.Errorf("Service/%s: targetPort %q is not a port of the pods it selects", svc.Name, sp.TargetPort.StrVal)
						}
					}
				}
			}
			if !matched {
				t.Errorf("Service/%s selects no pod", svc.Name)
			}
			if svc.Spec.ClusterIP != corev1.ClusterIPNone {
				consumers = true
			}
		}
		if !consumers {
			t.Error("no Service for consumers")
		}
	})
}

// TestSecurityCredentialsOutOfArgv: issue 11, item 5 ("credentials from
// files or the environment, so they stay out of argv") and the Low finding
// "pprof's cmdline shows tokens passed as flags": the manifests passed every
// token as a flag (-api-token=$(OUTPOST_API_TOKEN)), where ps,
// /proc/<pid>/cmdline and pprof's cmdline show it. Now no container takes a
// credential flag or a Secret in its environment; each token is a file of a
// Secret volume that other users cannot read, named by a -…-file flag.
func TestSecurityCredentialsOutOfArgv(t *testing.T) {
	m := load(t)
	type pod struct {
		who   string
		spec  corev1.PodSpec
		files []string // the -…-file flags its binary needs
	}
	var pods []pod
	for _, d := range m.deployments {
		pods = append(pods, pod{"Deployment/" + d.Name, d.Spec.Template.Spec, []string{"cloud-token-file"}})
	}
	for _, s := range m.statefulSets {
		pods = append(pods, pod{"StatefulSet/" + s.Name, s.Spec.Template.Spec, []string{"api-token-file", "edge-tokens-file"}})
	}
	if len(pods) == 0 {
		t.Fatal("no pods")
	}
	inArgv := []string{"api-token", "cloud-token", "edge-token", "wechat-secret"}
	for _, p := range pods {
		for _, c := range p.spec.Containers {
			who := p.who + "/" + c.Name
			for _, e := range c.Env {
				if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
					t.Errorf("%s: env %s comes from Secret %s: mount it as a file instead", who, e.Name, e.ValueFrom.SecretKeyRef.Name)
				}
			}
			given := map[string][]string{}
			for _, a := range append(slices.Clone(c.Command), c.Args...) {
				name, val, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
				if slices.Contains(inArgv, name) {
					t.Errorf("%s: %q passes a credential on the command line", who, a)
				}
				given[name] = append(given[name], val)
			}
			for _, f := range p.files {
				if len(given[f]) == 0 {
					t.Errorf("%s: -%s is required (the credential as a file)", who, f)
				}
				for _, path := range given[f] {
					vm, ok := mountFor(c, path)
					v := volume(p.spec, vm.Name)
					switch {
					case !ok || v == nil || v.Secret == nil:
						t.Errorf("%s: -%s=%s is not on a Secret volume", who, f, path)
					case v.Secret.DefaultMode == nil || *v.Secret.DefaultMode&0o007 != 0:
						t.Errorf("%s: Secret volume %s: set defaultMode without access for others (e.g. 0440), not the default 0644", who, vm.Name)
					case p.spec.SecurityContext == nil || p.spec.SecurityContext.FSGroup == nil:
						t.Errorf("%s: a 0440 Secret volume needs the pod's fsGroup to be readable by the non-root user", who)
					}
				}
			}
		}
	}
}

func matches(sel, podLabels map[string]string) bool {
	if len(sel) == 0 {
		return false
	}
	for k, v := range sel {
		if podLabels[k] != v {
			return false
		}
	}
	return true
}

// TestDockerfiles checks the images are multi-stage, static and non-root,
// ship the configs and policies, and start the binary with flags it accepts.
func TestDockerfiles(t *testing.T) {
	flagsOf := binaryFlags(t)
	for _, b := range []string{"edge", "cloud-sync"} {
		path := filepath.Join(root, "deploy", "docker", b+".Dockerfile")
		raw, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		s := string(raw)
		for _, want := range []string{
			"golang:1.26 AS build", "CGO_ENABLED=0", "./cmd/" + b,
			"USER 65532:65532", "COPY configs/", "COPY policies/",
			`ENTRYPOINT ["/usr/local/bin/` + b + `"]`,
		} {
			if !strings.Contains(s, want) {
				t.Errorf("%s lacks %q", path, want)
			}
		}
		froms := regexp.MustCompile(`(?m)^FROM[ \t]+(.+)$`).FindAllStringSubmatch(s, -1)
		if len(froms) < 2 {
			t.Errorf("%s: want a multi-stage build", path)
		} else if last := froms[len(froms)-1][1]; !strings.Contains(last, "distroless/static") && last != "scratch" {
			t.Errorf("%s: final stage %q: want distroless/static or scratch", path, last)
		}
		cmd := regexp.MustCompile(`(?m)^CMD (\[.*\])$`).FindStringSubmatch(s)
		if cmd == nil {
			t.Errorf("%s: no exec-form CMD", path)
			continue
		}
		var args []string
		if err := json.Unmarshal([]byte(cmd[1]), &args); err != nil {
			t.Fatalf("%s: CMD: %v", path, err)
		}
		for _, a := range args {
			if name, ok := strings.CutPrefix(a, "-"); ok && !flagsOf[b][name] {
				t.Errorf("%s: CMD flag %s is not accepted by %s", path, a, b)
			}
		}
	}
}
