"""Reading datasets into the common columns, splitting them, images, behaviour labels."""
