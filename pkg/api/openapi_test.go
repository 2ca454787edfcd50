package api

import (
	"encoding/json"
	"net/http"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
)

// openAPIDoc is the part of an OpenAPI 3 document the test checks.
type openAPIDoc struct {
	OpenAPI  string                         `json:"openapi"`
	Security []map[string][]string          `json:"security"`
	Paths    map[string]map[string]oaOperat `json:"paths"`
	Comps    struct {
		Parameters map[string]oaParam `json:"parameters"`
	} `json:"components"`
}

type oaOperat struct {
	OperationID string                 `json:"operationId"`
	Security    *[]map[string][]string `json:"security"`
	Parameters  []oaParam              `json:"parameters"`
	Responses   map[string]any         `json:"responses"`
}

type oaParam struct {
	Ref  string `json:"$ref"`
	Name string `json:"name"`
	In   string `json:"in"`
}

var fiberParam = regexp.MustCompile(`:([A-Za-z0-9_]+)`)

// TestOpenAPIMatchesRoutes holds the served document to the real server:
// the same set of (method, path) as the Fiber routes, each path parameter
// declared, and each operation's security what the server does — a
// request without a token is a 401 exactly where the document says a
// bearer token is required.
func TestOpenAPIMatchesRoutes(t *testing.T) {
	e := newEnv(t)
	r := e.raw("/api/v1/openapi.json", "", nil)
	if r.status != 200 || !strings.HasPrefix(r.header.Get("Content-Type"), "application/json") {
		t.Fatalf("GET /api/v1/openapi.json: %d %s", r.status, r.header.Get("Content-Type"))
	}
	var doc openAPIDoc
	if err := json.Unmarshal(r.body, &doc); err != nil {
		t.Fatalf("document: %v", err)
	}
	if !strings.HasPrefix(doc.OpenAPI, "3.") {
		t.Fatalf("openapi %q, want 3.x", doc.OpenAPI)
	}

	routes := map[string]bool{}
	for _, rt := range e.srv.App().GetRoutes(true) {
		if rt.Method == http.MethodHead || rt.Path == "/" || rt.Path == "" {
			continue // HEAD mirrors every GET; "/" is the catch-all 404
		}
		routes[rt.Method+" "+fiberParam.ReplaceAllString(rt.Path, "{$1}")] = true
	}
	documented := map[string]oaOperat{}
	for path, ops := range doc.Paths {
		for method, op := range ops {
			documented[strings.ToUpper(method)+" "+path] = op
		}
	}
	for rt := range routes {
		if _, ok := documented[rt]; !ok {
			t.Errorf("route %s is not in openapi.json", rt)
		}
	}
	keys := make([]string, 0, len(documented))
	for k := range documented {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	if len(keys) < 10 {
		t.Fatalf("only %d operations documented", len(keys))
	}
	tok := e.token("root")
	for _, k := range keys {
		op := documented[k]
		method, path, _ := strings.Cut(k, " ")
		t.Run(op.OperationID, func(t *testing.T) {
			if !routes[k] {
				t.Fatalf("documented %s is not a route", k)
			}
			if len(op.Responses) == 0 {
				t.Error("no responses documented")
			}
			// Every {param} of the path is declared in the path.
			declared := map[string]bool{}
			for _, p := range op.Parameters {
				if p.Ref != "" {
					p = doc.Comps.Parameters[strings.TrimPrefix(p.Ref, "#/components/parameters/")]
				}
				if p.In == "path" {
					declared[p.Name] = true
				}
			}
			for _, m := range regexp.MustCompile(`\{([^}]+)\}`).FindAllStringSubmatch(path, -1) {
				if !declared[m[1]] {
					t.Errorf("path parameter %s is not declared", m[1])
				}
			}
			sec := doc.Security
			if op.Security != nil {
				sec = *op.Security
			}
			needsToken := slices.ContainsFunc(sec, func(s map[string][]string) bool { _, ok := s["bearer"]; return ok })
			concrete := strings.NewReplacer("{id}", "dev-x", "{openid}", "o-x").Replace(path)
			hr, err := http.NewRequest(method, e.base+concrete, nil)
			if err != nil {
				t.Fatal(err)
			}
			resp, err := e.client.Do(hr)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if got := resp.StatusCode == http.StatusUnauthorized; got != needsToken {
				t.Fatalf("%s without a token: %d; the document says a token is required: %v", k, resp.StatusCode, needsToken)
			}
			if needsToken {
				// With one, the route is served (not a 401 nor the 404 of
				// an unknown endpoint).
				hr, _ = http.NewRequest(method, e.base+concrete, nil)
				hr.Header.Set("Authorization", "Bearer "+tok)
				resp, err := e.client.Do(hr)
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				if resp.StatusCode == http.StatusUnauthorized {
					t.Fatalf("%s with a token: 401", k)
				}
			}
		})
	}
}
