//! `portico dev`: a whole deployment on one machine. [`Deployment`] is also
//! what the end-to-end tests start.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use portico_agent::{RouterClient, RouterTrust};
use portico_proto::api::{App, AppSpec, CreateToken, TokenCreated, TokenScope};
use portico_proto::{AppId, GroupId, RegionId};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cli::DevArgs;
use crate::{demo, out, shutdown_on_signal};

/// The apps domain of a dev deployment; curl and browsers resolve
/// `*.localhost` to loopback on their own.
pub const DEV_APPS_DOMAIN: &str = "apps.localhost";

const LOOPBACK: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

/// Knobs of a dev deployment.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// Public HTTPS port of the edge; 0 picks a free one.
    pub public_port: u16,
    /// Tunnels the connector keeps.
    pub connector_tunnels: usize,
    /// Lifetime of edge and connector certificates (the router's default
    /// when `None`).
    pub cert_ttl: Option<std::time::Duration>,
}

impl Default for DevOptions {
    fn default() -> Self {
        DevOptions {
            public_port: 0,
            connector_tunnels: 2,
            cert_ttl: None,
        }
    }
}

/// A router, an edge, a connector and the demo backend, all on loopback.
pub struct Deployment {
    pub data: PathBuf,
    pub router: portico_router::Handle,
    pub edge: portico_edge::Handle,
    pub connector: portico_connector::Handle,
    pub demo: demo::Demo,
    /// An admin client of the router.
    pub admin: RouterClient,
    /// The published demo app.
    pub app: App,
    /// Stops only the router (children of the deployment's token).
    pub router_stop: CancellationToken,
    /// Stops only the edge.
    pub edge_stop: CancellationToken,
    /// Stops only the connector.
    pub connector_stop: CancellationToken,
}

impl Deployment {
    /// Starts everything with state under `data` (reused if present) and
    /// publishes the demo app as `hello`. `public_port` 0 picks a free port.
    pub async fn start(
        data: &Path,
        opts: &DevOptions,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Deployment> {
        let public_port = opts.public_port;
        let mut rc = portico_router::Config::new(data.join("router"));
        rc.listen = LOOPBACK;
        rc.metrics_listen = Some(LOOPBACK);
        rc.dns_listen = Some(LOOPBACK);
        rc.apps_domain = DEV_APPS_DOMAIN.to_owned();
        if let Some(ttl) = opts.cert_ttl {
            rc.cert_ttl = ttl;
        }
        let router_stop = shutdown.child_token();
        let edge_stop = shutdown.child_token();
        let connector_stop = shutdown.child_token();
        let router = portico_router::start(rc, router_stop.clone())
            .await
            .context("router failed to start")?;
        let admin = RouterClient::new(
            &router.url(),
            RouterTrust::CaPem(router.ca_pem.clone()),
            None,
        )?
        .with_bearer(router.admin_token());

        let edge_state = data.join("edge");
        let edge = {
            let token = if has_credentials(&edge_state) {
                None
            } else {
                Some(
                    create_token(
                        &admin,
                        TokenScope::Edge {
                            region: RegionId::default_region(),
                        },
                    )
                    .await?,
                )
            };
            let mut ec = portico_edge::Config::new(router.url(), &edge_state);
            ec.token = token;
            ec.public_listen = SocketAddr::new(LOOPBACK.ip(), public_port);
            ec.tunnel_listen = LOOPBACK;
            ec.metrics_listen = Some(LOOPBACK);
            // Nobody resolves the dev edge through DNS: stop at once.
            ec.drain_delay = std::time::Duration::ZERO;
            ec.grace = std::time::Duration::from_secs(5);
            match portico_edge::start(ec.clone(), edge_stop.clone()).await {
                Ok(edge) => edge,
                Err(e) if public_port != 0 => {
                    warn!(port = public_port, error = %portico_agent::error_chain(&e), "cannot use the public port; picking a free one");
                    ec.public_listen = LOOPBACK;
                    portico_edge::start(ec, edge_stop.clone())
                        .await
                        .context("edge failed to start")?
                }
                Err(e) => return Err(e).context("edge failed to start"),
            }
        };

        let demo = demo::start(LOOPBACK, shutdown.clone())
            .await
            .context("demo app failed to start")?;
        let app = publish(
            &admin,
            "hello",
            &format!("http://{}/", demo.addr),
            GroupId::default_group(),
        )
        .await?;

        let connector_state = data.join("connector");
        let token = if has_credentials(&connector_state) {
            None
        } else {
            Some(
                create_token(
                    &admin,
                    TokenScope::Connector {
                        group: GroupId::default_group(),
                    },
                )
                .await?,
            )
        };
        let mut cc = portico_connector::Config::new(router.url(), &connector_state);
        cc.token = token;
        cc.tunnels = opts.connector_tunnels;
        cc.metrics_listen = Some(LOOPBACK);
        let connector = portico_connector::start(cc, connector_stop.clone())
            .await
            .context("connector failed to start")?;
        connector.wait_tunnels(1).await;
        edge.ready().await;
        // The app's URL carries the edge's port once the edge has reported it.
        let app: App = admin.get_json(&format!("/v1/apps/{}", app.id)).await?;
        Ok(Deployment {
            data: data.to_owned(),
            router,
            edge,
            connector,
            demo,
            admin,
            app,
            router_stop,
            edge_stop,
            connector_stop,
        })
    }

    /// The URL of the demo app, with the edge's actual port.
    pub fn app_url(&self) -> String {
        format!(
            "https://{}:{}/",
            self.app.external_host,
            self.edge.public_addr.port()
        )
    }

    /// A `dig` command line that shows the demo app's DNS chain: its CNAME
    /// to the edge's region, then the edge's address.
    pub fn dig_line(&self) -> Option<String> {
        let dns = self.router.dns_addr?;
        Some(format!(
            "dig @{} -p {} {} A",
            dns.ip(),
            dns.port(),
            self.app.external_host
        ))
    }

    /// The router CA, which signed the edge's public certificate.
    pub fn ca_path(&self) -> PathBuf {
        self.data.join("router").join("ca.pem")
    }

    /// Waits for every part to stop (after the shutdown token is cancelled).
    pub async fn wait(self) -> anyhow::Result<()> {
        let (c, e) = tokio::join!(self.connector.wait(), self.edge.wait());
        self.demo.wait().await;
        let r = self.router.wait().await;
        c?;
        e?;
        r?;
        Ok(())
    }
}

/// Creates a join token.
pub async fn create_token(admin: &RouterClient, scope: TokenScope) -> anyhow::Result<String> {
    let t: TokenCreated = admin
        .post_json(
            "/v1/tokens",
            &CreateToken {
                scope,
                ttl_secs: None,
            },
        )
        .await
        .context("creating a join token")?;
    Ok(t.token)
}

/// Publishes (or re-publishes) an app at `<id>.<apps domain>`.
pub async fn publish(
    admin: &RouterClient,
    id: &str,
    internal_url: &str,
    group: GroupId,
) -> anyhow::Result<App> {
    let path = format!("/v1/apps/{id}");
    if admin.get_json::<App>(&path).await.is_ok() {
        admin.delete(&path).await?;
    }
    let spec = AppSpec {
        connector_group: group,
        ..AppSpec::new(AppId::new(id)?, internal_url)
    };
    admin
        .post_json("/v1/apps", &spec)
        .await
        .with_context(|| format!("publishing app {id}"))
}

fn has_credentials(state: &Path) -> bool {
    state.join("credentials.json").exists()
}

/// Runs `portico dev` until Ctrl-C.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let shutdown = shutdown_on_signal();
    let (data, _tmp) = match args.data {
        Some(d) => (d, None),
        None => {
            let tmp = tempfile::Builder::new()
                .prefix("portico-dev-")
                .tempdir()
                .context("cannot create a temporary directory")?;
            (tmp.path().to_owned(), Some(tmp))
        }
    };
    let opts = DevOptions {
        public_port: args.port,
        ..DevOptions::default()
    };
    let d = Deployment::start(&data, &opts, shutdown.clone()).await?;
    let url = d.app_url();
    let router_dir = data.join("router");
    info!(url = %url, "demo app published");
    out("");
    out("Portico is running: router, edge, connector and a demo app on this machine.");
    out("");
    out(format!("  App URL:  {url}"));
    out(format!(
        "  Try it:   curl --cacert {} {url}",
        d.ca_path().display()
    ));
    if let Some(dig) = d.dig_line() {
        out(format!("  DNS:      {dig}"));
    }
    out("");
    out("  Admin commands (in another shell):");
    out(format!(
        "    export PORTICO_ROUTER={} PORTICO_ROUTER_CA={} PORTICO_ADMIN_TOKEN_FILE={}",
        d.router.url(),
        router_dir.join("ca.pem").display(),
        router_dir.join("admin-token").display()
    ));
    out("    portico app list; portico connector list; portico edge list");
    out("");
    out(format!(
        "  State:    {}{}",
        data.display(),
        if _tmp.is_some() {
            " (deleted on exit; keep it with --data DIR)"
        } else {
            ""
        }
    ));
    out("  Press Ctrl-C to stop.");
    shutdown.cancelled().await;
    d.wait().await
}
