//! typed configuration for the proxy and the agent
