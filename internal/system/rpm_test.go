package system

import (
	"reflect"
	"testing"
)

func TestParseRepoquery(t *testing.T) {
	got := parseRepoquery("hellod\tnoarch\t0:1.0-1\nhellod\tnoarch\t0:2.0-1\n\nhellod\tnoarch\t0:2.0-1\nother\tx86_64\t3:1.2-4.el9\n")
	want := map[string][]string{"hellod": {"1.0-1", "2.0-1"}, "hellod.noarch": {"1.0-1", "2.0-1"}, "other": {"3:1.2-4.el9"}, "other.x86_64": {"3:1.2-4.el9"}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v", got)
	}
}

func TestParseYumList(t *testing.T) {
	out := `Installed Packages
hellod.noarch                        1.0-1                         @test
Available Packages
hellod.noarch                        1.0-1                         test
hellod.noarch                        2.0-1                         test
a-package-with-a-very-long-name.x86_64
                                     1:4.5-6.amzn2                 amzn2-core
`
	got := parseYumList(out)
	want := map[string][]string{"hellod": {"1.0-1", "2.0-1"}, "hellod.noarch": {"1.0-1", "2.0-1"},
		"a-package-with-a-very-long-name": {"1:4.5-6.amzn2"}, "a-package-with-a-very-long-name.x86_64": {"1:4.5-6.amzn2"}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v", got)
	}
}
