package dist

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

func TestCheckVersion(t *testing.T) {
	for _, v := range []string{"2.1", "2.1.3", "10.20.30"} {
		if err := CheckVersion(v); err != nil {
			t.Errorf("%q: %v", v, err)
		}
	}
	for _, v := range []string{"2", "v2.1", "2.1.3.4", "2.x", "", "2.1-rc1", "2.1/../x"} {
		if err := CheckVersion(v); err == nil || !strings.Contains(err.Error(), "MAJOR.MINOR") {
			t.Errorf("%q accepted: %v", v, err)
		}
	}
}

func TestNames(t *testing.T) {
	if ChecksumName != "opsagent.tgz.sha256" || SignatureName != "opsagent.tgz.minisig" {
		t.Errorf("names %s %s", ChecksumName, SignatureName)
	}
	if got := BinaryName("arm64"); got != "opsagent-linux-arm64" {
		t.Errorf("BinaryName %q", got)
	}
	a := Arches()
	a[0] = "mips" // a caller's change must not leak into the next call
	if got := Arches(); len(got) != 2 || got[0] != "amd64" || got[1] != "arm64" {
		t.Errorf("Arches %v", got)
	}
}

const sum = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

func TestLatestRoundTrip(t *testing.T) {
	want := Latest{Version: "2.3.1", SHA256: sum, PublishedAt: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	body, err := EncodeLatest(want)
	if err != nil {
		t.Fatal(err)
	}
	got, err := ReadLatest(bytes.NewReader(body))
	if err != nil || got != want {
		t.Fatalf("round trip: %+v %v\n%s", got, err, body)
	}
	// Fields added by a later release do not break this one; hex case
	// does not matter.
	got, err = ReadLatest(strings.NewReader(`{"version":"2.4","sha256":"` + strings.ToUpper(sum) + `","arches":["riscv64"]}`))
	if err != nil || got.Version != "2.4" || got.SHA256 != sum {
		t.Errorf("extra field / upper case: %+v %v", got, err)
	}
}

func TestReadLatestRefusals(t *testing.T) {
	for name, body := range map[string]string{
		"not json":       "<html>403</html>",
		"empty":          "",
		"no version":     `{"sha256":"` + sum + `"}`,
		"bad version":    `{"version":"v2.1","sha256":"` + sum + `"}`,
		"short sha":      `{"version":"2.1","sha256":"abc"}`,
		"non-hex sha":    `{"version":"2.1","sha256":"` + strings.Repeat("z", 64) + `"}`,
		"trailing junk":  `{"version":"2.1","sha256":"` + sum + `"} {}`,
		"wrong type":     `{"version":2.1,"sha256":"` + sum + `"}`,
		"over the limit": `{"version":"2.1","sha256":"` + sum + `","pad":"` + strings.Repeat("x", maxLatestSize) + `"}`,
	} {
		if _, err := ReadLatest(strings.NewReader(body)); err == nil || !strings.Contains(err.Error(), LatestName) {
			t.Errorf("%s: %v", name, err)
		}
	}
	if _, err := EncodeLatest(Latest{Version: "2.1", SHA256: "abc"}); err == nil {
		t.Error("EncodeLatest wrote an invalid latest.json")
	}
}

func TestNewer(t *testing.T) {
	for _, tc := range []struct {
		v, cur string
		want   bool
	}{{"2.0.0", "1.9.9", true}, {"1.10", "1.9", true}, {"1.9", "1.10", false}, {"2.0", "2.0.0", false}, {"2.0.1", "2.0", true}, {"1.0", "dev", true}, {"x", "1.0", false}} {
		if got := Newer(tc.v, tc.cur); got != tc.want {
			t.Errorf("newer(%s, %s) = %v", tc.v, tc.cur, got)
		}
	}
}
