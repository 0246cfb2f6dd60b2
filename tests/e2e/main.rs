//! End-to-end tests of kha on the real kernel. Each test builds its own bed (network
//! namespaces for a node and three masters, a child cgroup, a pin dir) and attaches only
//! there. Run through `cargo xtask test`, one test at a time.

mod coexist;
mod conn_v2;
mod conns;
mod datapath;
mod discovery;
mod endpoints;
mod harness;
mod health;
mod lifecycle;
mod migration;
mod other_prog;
mod privileges;
mod rebalance;
mod refusals;
mod terminate;
mod top;
mod trace;
