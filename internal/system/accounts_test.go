package system

import "testing"

func TestParsePasswdAndGroup(t *testing.T) {
	users := ParsePasswd([]byte("root:x:0:0:root:/root:/bin/bash\n# comment\nbroken\n+nis::::::\nbob:x:1000:1000:Bob,,,:/home/bob:/bin/sh\nbad:x:notanumber:1::/:/bin/sh\n"))
	if len(users) != 2 || users[1] != (User{Name: "bob", UID: 1000, GID: 1000, Gecos: "Bob,,,", Home: "/home/bob", Shell: "/bin/sh"}) {
		t.Fatalf("users %+v", users)
	}
	groups := ParseGroup([]byte("root:x:0:\nsudo:x:27:bob,alice\nbad:x:y:\n"))
	if len(groups) != 2 || groups[1].Name != "sudo" || groups[1].GID != 27 || len(groups[1].Members) != 2 {
		t.Fatalf("groups %+v", groups)
	}
}
