// Package docs holds the project's design documents. Its test keeps them
// standing on their own: every relative link in the repository's Markdown
// files must resolve to a file inside the repository (and a #fragment to a
// heading of the file it names), and no document may point outside the
// repository to material a user who clones it does not have.
package docs

import (
	"bufio"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"unicode"
)

// TestMarkdownLinks checks every Markdown file of the repository.
func TestMarkdownLinks(t *testing.T) {
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	files := markdownFiles(t, root)
	for _, want := range []string{"README.md", "docs/architecture.md", "pkg/store/DESIGN.md", "pkg/syncer/DESIGN.md", "pkg/cloud/fsm/DESIGN.md"} {
		if !slices.Contains(files, filepath.Join(root, want)) {
			t.Errorf("%s is missing", want)
		}
	}
	for _, f := range files {
		rel, _ := filepath.Rel(root, f)
		for _, p := range checkFile(root, f) {
			t.Errorf("%s: %s", rel, p)
		}
	}
}

// TestCheckerFindsProblems proves the checker can fail: the fixture has one
// of each problem it must report, and one link of each kind it must accept.
func TestCheckerFindsProblems(t *testing.T) {
	root, err := filepath.Abs("testdata")
	if err != nil {
		t.Fatal(err)
	}
	got := checkFile(root, filepath.Join(root, "broken.md"))
	want := []string{
		`line 5: link "missing.md": does not resolve`,
		`line 6: link "good.md#no-such-heading": good.md has no heading for #no-such-heading`,
		`line 7: link "#nowhere": broken.md has no heading for #nowhere`,
		`line 8: link "../outside.md": leaves the repository`,
		`line 9: mentions "../shared", which is not in the repository`,
		`line 10: mentions "design brief", which is not in the repository`,
		`line 11: link "sub/gone.md": does not resolve`,
	}
	if !slices.Equal(got, want) {
		t.Errorf("problems:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// markdownFiles lists the repository's Markdown files, skipping what is not
// the project's own documentation.
func markdownFiles(t *testing.T, root string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			switch d.Name() {
			case ".git", "node_modules", "testdata", "bin", "data", "vendor":
				return filepath.SkipDir
			}
			return nil
		}
		if strings.HasSuffix(d.Name(), ".md") {
			out = append(out, path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

var (
	// inlineLink matches [text](target) and ![alt](target), the target up to
	// a space (an optional title follows) or the closing parenthesis.
	inlineLink = regexp.MustCompile(`!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)`)
	// refLink matches a reference definition: [label]: target.
	refLink    = regexp.MustCompile(`^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$`)
	inlineCode = regexp.MustCompile("`[^`]*`")
)

// outside are mentions of material that lives outside the repository.
var outside = []string{"../shared", "design brief"}

// checkFile returns the problems of one Markdown file; root bounds where
// relative links may point.
func checkFile(root, path string) []string {
	b, err := os.ReadFile(path)
	if err != nil {
		return []string{err.Error()}
	}
	var problems []string
	fence := ""
	sc := bufio.NewScanner(strings.NewReader(string(b)))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		lower := strings.ToLower(line)
		for _, o := range outside {
			if strings.Contains(lower, o) {
				problems = append(problems, fmt.Sprintf("line %d: mentions %q, which is not in the repository", n, o))
			}
		}
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "```") || strings.HasPrefix(trimmed, "~~~") {
			switch {
			case fence == "":
				fence = trimmed[:3]
			case strings.HasPrefix(trimmed, fence):
				fence = ""
			}
			continue
		}
		if fence != "" {
			continue // code blocks hold no links
		}
		text := inlineCode.ReplaceAllString(line, "")
		var targets []string
		for _, m := range inlineLink.FindAllStringSubmatch(text, -1) {
			targets = append(targets, m[1])
		}
		if m := refLink.FindStringSubmatch(text); m != nil {
			targets = append(targets, m[1])
		}
		for _, target := range targets {
			if p := checkLink(root, path, target); p != "" {
				problems = append(problems, fmt.Sprintf("line %d: link %q: %s", n, target, p))
			}
		}
	}
	return problems
}

// checkLink says what is wrong with one link target, or "".
func checkLink(root, from, target string) string {
	u, err := url.Parse(target)
	if err != nil {
		return "is not a valid URL"
	}
	if u.Scheme != "" || u.Host != "" {
		return "" // absolute: not checked offline
	}
	file := from
	if u.Path != "" {
		file = filepath.Join(filepath.Dir(from), filepath.FromSlash(u.Path))
		if rel, err := filepath.Rel(root, file); err != nil || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
			return "leaves the repository"
		}
		if _, err := os.Stat(file); err != nil {
			return "does not resolve"
		}
	}
	if u.Fragment == "" || !strings.HasSuffix(file, ".md") {
		return ""
	}
	anchors, err := headingAnchors(file)
	if err != nil {
		return err.Error()
	}
	if !anchors[u.Fragment] {
		return fmt.Sprintf("%s has no heading for #%s", filepath.Base(file), u.Fragment)
	}
	return ""
}

// headingAnchors returns the anchors GitHub gives the headings of a Markdown
// file: lower case, spaces to hyphens, punctuation other than '-' and '_'
// dropped, and -1, -2, … for repeats.
func headingAnchors(path string) (map[string]bool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	anchors := map[string]bool{}
	seen := map[string]int{}
	fence := false
	for _, line := range strings.Split(string(b), "\n") {
		t := strings.TrimSpace(line)
		if strings.HasPrefix(t, "```") || strings.HasPrefix(t, "~~~") {
			fence = !fence
			continue
		}
		if fence || !strings.HasPrefix(t, "#") {
			continue
		}
		h := strings.TrimSpace(strings.TrimLeft(t, "#"))
		var sb strings.Builder
		for _, r := range strings.ToLower(h) {
			switch {
			case r == ' ':
				sb.WriteRune('-')
			case r == '-' || r == '_' || unicode.IsLetter(r) || unicode.IsDigit(r):
				sb.WriteRune(r)
			}
		}
		a := sb.String()
		if k := seen[a]; k > 0 {
			anchors[fmt.Sprintf("%s-%d", a, k)] = true
		} else {
			anchors[a] = true
		}
		seen[a]++
	}
	return anchors, nil
}
