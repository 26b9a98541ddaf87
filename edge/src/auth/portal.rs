//! My Apps: the signed-in user's portal on the auth host (`GET /`), as
//! Entra's My Apps: the apps that sign users in, assign this user and are
//! not hidden, each with its name and home page (`App.home_url`). JSON for a client that
//! prefers it (`[{"id", "url"}]`), else a small HTML page.

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use portico_proto::api::App;
use serde::Serialize;

use super::oidc::User;
use crate::request::Body;

/// One entry of the portal.
#[derive(Debug, Serialize, PartialEq, Eq)]
struct Entry<'a> {
    id: &'a str,
    url: &'a str,
}

/// The apps `user` sees, by id.
fn entries<'a>(user: &User, apps: &'a [App]) -> Vec<Entry<'a>> {
    let mut list: Vec<Entry<'a>> = apps
        .iter()
        .filter(|a| super::signs_in(a) && !a.hidden && super::assigned(a, user))
        .map(|a| Entry {
            id: a.id.as_str(),
            // The home page (under the external URL); an older router
            // sends none.
            url: if a.home_url.is_empty() {
                a.external_url.as_str()
            } else {
                a.home_url.as_str()
            },
        })
        .collect();
    list.sort_by(|a, b| a.id.cmp(b.id));
    list
}

/// The portal page for `user`.
pub(crate) fn page<B>(req: &Request<B>, user: &User, apps: &[App]) -> Response<Body> {
    let list = entries(user, apps);
    let (body, ty) = if crate::pages::prefers_json(req.headers()) {
        (
            serde_json::to_vec(&list).unwrap_or_default(),
            "application/json",
        )
    } else {
        (html(user, &list).into_bytes(), "text/html; charset=utf-8")
    };
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(ty));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn html(user: &User, list: &[Entry<'_>]) -> String {
    let who = user
        .name
        .as_deref()
        .or(user.email.as_deref())
        .unwrap_or(&user.sub);
    let mut out = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>My Apps</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;padding:0 1rem}}\
         li{{margin:.5rem 0}}</style></head><body><h1>My Apps</h1><p>Signed in as {}. \
         <a href=\"/.portico/sign_out\">Sign out</a></p>",
        escape(who)
    );
    if list.is_empty() {
        out.push_str("<p id=\"none\">No application is assigned to you.</p>");
    } else {
        out.push_str("<ul id=\"apps\">");
        for e in list {
            out.push_str(&format!(
                "<li><a class=\"app\" data-app=\"{id}\" href=\"{url}\">{id}</a></li>",
                id = escape(e.id),
                url = escape(e.url)
            ));
        }
        out.push_str("</ul>");
    }
    out.push_str("</body></html>\n");
    out
}

/// HTML text and attribute escaping.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use portico_proto::api::{Assignment, SIGN_IN_FEATURE};

    fn app(id: &str, assignment: Assignment, hidden: bool, signs_in: bool) -> App {
        let mut a = crate::routing::tests::app(id, &format!("{id}.apps.test"));
        a.assignment = assignment;
        a.hidden = hidden;
        if signs_in {
            a.required_features = vec![SIGN_IN_FEATURE.to_owned()];
        }
        a
    }

    #[test]
    fn the_portal_lists_assigned_visible_apps_only_and_escapes_names() {
        let user = User {
            sub: "alice".into(),
            email: Some("alice@example.test".into()),
            email_verified: true,
            name: Some("<Alice>".into()),
            preferred_username: None,
            groups: vec!["devs".into()],
        };
        let everyone = Assignment {
            everyone: true,
            ..Default::default()
        };
        let devs = Assignment {
            groups: vec!["devs".into()],
            ..Default::default()
        };
        let others = Assignment {
            users: vec!["bob".into()],
            ..Default::default()
        };
        let apps = vec![
            app("wiki", everyone.clone(), false, true),
            app("build", devs, false, true),
            app("payroll", others, false, true),
            app("secret", everyone, true, true),
            app("open", Assignment::default(), false, false),
        ];
        let ids: Vec<&str> = entries(&user, &apps).iter().map(|e| e.id).collect();
        assert_eq!(ids, ["build", "wiki"]);
        let page = html(&user, &entries(&user, &apps));
        assert!(
            page.contains("&lt;Alice&gt;") && !page.contains("<Alice>"),
            "{page}"
        );
        assert!(page.contains("href=\"https://wiki.apps.test/\""), "{page}");
    }
}
