//! The SRE's commands: `builds …` over the ops API of a running service, `store …` on the
//! store of a stopped one. One file per command (`builds/`), `store.rs` beside them.

pub mod builds;
pub mod store;
