pub mod marker;
