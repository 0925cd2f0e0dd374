//! The VIO core: snoop engine, shadow available index, lockpage and the elastic controller.
//! Free of KVM so it is testable on plain memory (the IOPA-Snoop issue builds it).
